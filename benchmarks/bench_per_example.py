"""Per-example clipping and AGC against their peers (not run by the tests).

    nice -n 19 python benchmarks/bench_per_example.py [--quick]

(a) clipcore.torch.clip_and_accumulate_ against Opacus's
    DPOptimizer.clip_and_accumulate, and clipcore.per_example_global_norm_clip
    against a NumPy composition (einsum norms, tensordot sums), at batch 64
    and 256 on the lesson's MLP (784-256-128-10) and at batch 64 on
    ResNet-18's parameter list (11.7M values: 3.0 GB of float32 per-sample
    gradients at batch 64; batch 256 would be 12 GB, too much beside copies
    on a 24 GB machine shared with others); the MLP at 1 thread and at all
    threads. clipcore.torch's default path (one read of the per-sample
    gradients where a block of examples stays in cache) and its two-pass
    path, forced. Two ceilings (clipcore.bench._probe.bandwidth_probe, its read
    pass over at most 1 GB and scaled to the bytes by size): two read passes
    over the per-sample gradients' bytes, and one read pass plus a read-write
    pass over the sums' bytes (what a clip that reads them once moves).
(b) clipcore.torch.adaptive_clip_grad_ against timm's adaptive_clip_grad loop
    written out in torch ops, on ResNet-50's and GPT-2's parameter shapes
    (clipcore.workloads; params and grads random float32, grads restored
    before every call, outside the timing), and the ceiling of a read pass
    (the params) plus a read-write pass (the grads) over the list's bytes.

Medians of repeated calls, the per-example cases called in turn (ratios:
medians of pairs, with their ranges); AGC at all threads (torch.get_num_threads()).
"""
import argparse
import statistics
import time

import numpy as np
import torch

import clipcore
import clipcore.torch
from clipcore import kernels, workloads
from clipcore.bench._probe import bandwidth_probe


def resnet18_shapes():
    """torchvision.models.resnet18's parameters (PyTorch layout)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            c_in = inplanes if b == 0 else planes
            shapes += [(planes, c_in, 3, 3), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,)]
            if b == 0 and stage > 0:
                shapes += [(planes, c_in, 1, 1), (planes,), (planes,)]
        inplanes = planes
    return shapes + [(1000, 512), (1000,)]


MLP = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]


def median_time(fn, reps, setup=None):
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(cases, reps, setup):
    """Seconds of each case's calls, the cases called in turn reps times
    (setup before each call, untimed): {name: [seconds]}."""
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ceilings(nbytes, sum_bytes, n_threads):
    """(two reads, one read + a read-write of the sums) in seconds: the probe's
    read pass over nbytes (over at most 1 GB, scaled) and its read-write pass
    over the sums' bytes, on n_threads."""
    n = min(nbytes, 1 << 30) // 4
    buf = np.ones(n, np.float32)
    sums = np.ones(max(sum_bytes // 4, 1), np.float32)
    read = statistics.median(bandwidth_probe(buf, n_threads, read=True)[0] for _ in range(5))
    read *= nbytes / (4 * n)
    rw = statistics.median(bandwidth_probe(sums, n_threads, read=False)[1] for _ in range(5))
    return 2 * read, read + rw


def ratio(a, b):
    """The median of a[i] / b[i] over paired calls, with its range."""
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):4.2f} [{min(r):4.2f}..{max(r):4.2f}]"


def bench_per_example(name, shapes, batch, reps, n_threads):
    from opacus.optimizers import DPOptimizer
    from clipcore import _per_example
    torch.set_num_threads(n_threads)
    # 1 thread, or the default policy's team (torch's count, backed off after late teams).
    threads = 1 if n_threads == 1 else None
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad_sample = torch.randn((batch,) + tuple(p.shape), generator=gen)
    nbytes = sum(p.grad_sample.numel() * 4 for p in params)
    sum_bytes = sum(p.numel() * 4 for p in params)
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=1.0, expected_batch_size=batch)

    def reset():
        for p in params:
            p.summed_grad = None
            if hasattr(p.grad_sample, "_processed"):
                del p.grad_sample._processed

    def two_pass():            # the two-pass path, forced (no block of examples)
        saved, _per_example._BLOCK_BYTES = _per_example._BLOCK_BYTES, 0
        try:
            clipcore.torch.clip_and_accumulate_(params, 1.0, n_threads=threads)
        finally:
            _per_example._BLOCK_BYTES = saved

    arrays = [p.grad_sample.numpy() for p in params]

    def numpy_way():
        flat = [a.reshape(batch, -1) for a in arrays]
        norms = np.sqrt(sum(np.einsum("ij,ij->i", f, f) for f in flat))
        mult = np.minimum(1.0 / np.maximum(norms, 1e-30), 1.0).astype(np.float32)
        return [np.tensordot(mult, a, axes=1) for a in arrays]

    t = interleaved({
        "opacus": opt.clip_and_accumulate,
        "torch": lambda: clipcore.torch.clip_and_accumulate_(params, 1.0, n_threads=threads),
        "two_pass": two_pass,
        "numpy": numpy_way,
        "core": lambda: clipcore.per_example_global_norm_clip(arrays, 1.0, n_threads=threads),
    }, reps, reset)
    two, one = ceilings(nbytes, sum_bytes, n_threads)
    med = {k: statistics.median(v) for k, v in t.items()}
    path = "one-read" if _per_example._block_rows(
        [a.reshape(batch, -1) for a in arrays], batch) else "two-pass"
    print(f"{name:9s} B={batch:3d} {n_threads}t {nbytes / 1e9:6.2f} GB | opacus "
          f"{med['opacus'] * 1e3:8.2f} ms, clipcore.torch ({path}) {med['torch'] * 1e3:8.2f} ms: "
          f"{ratio(t['opacus'], t['torch'])}x; two-pass path {med['two_pass'] * 1e3:8.2f} ms: "
          f"{ratio(t['opacus'], t['two_pass'])}x | numpy {med['numpy'] * 1e3:8.2f} ms, "
          f"per_example {med['core'] * 1e3:8.2f} ms: {ratio(t['numpy'], t['core'])}x | "
          f"ceilings: 2 reads {two * 1e3:8.2f} ms (torch {two / med['torch']:4.2f}, "
          f"two-pass {two / med['two_pass']:4.2f}, core {two / med['core']:4.2f} of it), "
          f"1 read {one * 1e3:8.2f} ms (torch {one / med['torch']:4.2f} of it; "
          f"opacus / 1-read ceiling {med['opacus'] / one:4.2f}x: the most any clip can gain)",
          flush=True)
    del params, arrays, opt


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad's loop in torch ops: clipcore.torch's own
    form of it for the tensors its kernels do not read."""
    clipcore.torch._adaptive_clip_grad_torch([p for p in parameters if p.grad is not None],
                                             clip_factor, eps, norm_type)


def bench_agc(workload, reps):
    gen = torch.Generator().manual_seed(1)
    params = []
    for s in workloads.shapes(workload):
        p = torch.nn.Parameter(torch.randn(s, generator=gen))
        p.grad = torch.randn(s, generator=gen) * 0.01
        params.append(p)
    saved = [p.grad.clone() for p in params]
    nbytes = sum(p.numel() * 4 for p in params)

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    t_timm = median_time(lambda: timm_adaptive_clip_grad(params, 0.01), reps, restore)
    t_cc = median_time(lambda: clipcore.torch.adaptive_clip_grad_(params, 0.01), reps, restore)
    # What AGC must move at least: the params read, the grads read and written
    # (every unit clipped: the most a clip may write).
    _, floor = ceilings(nbytes, nbytes, torch.get_num_threads())
    print(f"AGC {workload:9s} {len(params):4d} tensors {nbytes / 1e6:7.1f} MB per list | "
          f"timm loop {t_timm * 1e3:8.2f} ms clipcore.torch {t_cc * 1e3:8.2f} ms "
          f"({t_timm / t_cc:4.1f}x) | ceiling: a read + a read-write pass {floor * 1e3:8.2f} ms "
          f"(clipcore {floor / t_cc:4.2f} of it; timm / ceiling {t_timm / floor:4.1f}x: "
          f"the most any AGC can gain)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    k = 1 if args.quick else 3
    print(f"threads: torch {torch.get_num_threads()}, OpenMP {kernels.max_threads()}; "
          f"SIMD {kernels.simd_path()}")
    for n_threads in sorted({1, kernels.max_threads()}):
        bench_per_example("mlp", MLP, 64, 20 * k, n_threads)
        bench_per_example("mlp", MLP, 256, 10 * k, n_threads)
    bench_per_example("resnet18", resnet18_shapes(), 64, 2 * k, kernels.max_threads())
    bench_agc("resnet50", 5 * k)
    bench_agc("gpt2", 2 * k)


if __name__ == "__main__":
    main()
