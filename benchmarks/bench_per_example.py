"""Per-example clipping and AGC against their peers (not run by the tests).

    nice -n 19 python benchmarks/bench_per_example.py [--quick]

(a) clipcore.torch.clip_and_accumulate_ against Opacus's
    DPOptimizer.clip_and_accumulate, and clipcore.per_example_global_norm_clip
    against a NumPy composition (einsum norms, tensordot sums), at batch 64
    and 256 on the lesson's MLP (784-256-128-10) and at batch 64 on
    ResNet-18's parameter list (11.7M values: 3.0 GB of float32 per-sample
    gradients at batch 64; batch 256 would be 12 GB, too much beside copies
    on a 24 GB machine shared with others). The ceiling is two read passes
    over the per-sample gradients' bytes (clipcore.bench._probe.bandwidth_probe's
    read pass, over at most 1 GB and scaled to the bytes by size).
(b) clipcore.torch.adaptive_clip_grad_ against timm's adaptive_clip_grad loop
    written out in torch ops, on ResNet-50's and GPT-2's parameter shapes
    (clipcore.workloads; params and grads random float32, grads restored
    before every call, outside the timing).

Medians of repeated calls, all threads (torch.get_num_threads()).
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


def read_ceiling(nbytes):
    """Seconds for two read passes over nbytes (probed over at most 1 GB, scaled)."""
    n = min(nbytes, 1 << 30) // 4
    buf = np.ones(n, np.float32)
    reads = [bandwidth_probe(buf, read=True)[0] for _ in range(5)]
    return 2 * statistics.median(reads) * nbytes / (4 * n)


def bench_per_example(name, shapes, batch, reps):
    from opacus.optimizers import DPOptimizer
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad_sample = torch.randn((batch,) + tuple(p.shape), generator=gen)
    nbytes = sum(p.grad_sample.numel() * 4 for p in params)
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=1.0, expected_batch_size=batch)

    def reset():
        for p in params:
            p.summed_grad = None
            if hasattr(p.grad_sample, "_processed"):
                del p.grad_sample._processed

    t_opacus = median_time(opt.clip_and_accumulate, reps, reset)
    t_cc = median_time(lambda: clipcore.torch.clip_and_accumulate_(params, 1.0), reps, reset)
    arrays = [p.grad_sample.numpy() for p in params]

    def numpy_way():
        flat = [a.reshape(batch, -1) for a in arrays]
        norms = np.sqrt(sum(np.einsum("ij,ij->i", f, f) for f in flat))
        mult = np.minimum(1.0 / np.maximum(norms, 1e-30), 1.0).astype(np.float32)
        return [np.tensordot(mult, a, axes=1) for a in arrays]

    t_np = median_time(numpy_way, reps)
    t_pe = median_time(lambda: clipcore.per_example_global_norm_clip(arrays, 1.0), reps)
    ceiling = read_ceiling(nbytes)
    print(f"{name:9s} B={batch:3d} {nbytes / 1e9:6.2f} GB | opacus {t_opacus * 1e3:8.2f} ms "
          f"clipcore.torch {t_cc * 1e3:8.2f} ms ({t_opacus / t_cc:4.1f}x) | numpy "
          f"{t_np * 1e3:8.2f} ms per_example {t_pe * 1e3:8.2f} ms ({t_np / t_pe:4.1f}x) | "
          f"2-read ceiling {ceiling * 1e3:8.2f} ms: torch {ceiling / t_cc:4.2f}, "
          f"core {ceiling / t_pe:4.2f} of it", flush=True)
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
    print(f"AGC {workload:9s} {len(params):4d} tensors {nbytes / 1e6:7.1f} MB per list | "
          f"timm loop {t_timm * 1e3:8.2f} ms clipcore.torch {t_cc * 1e3:8.2f} ms "
          f"({t_timm / t_cc:4.1f}x)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    k = 1 if args.quick else 3
    print(f"threads: torch {torch.get_num_threads()}, OpenMP {kernels.max_threads()}; "
          f"SIMD {kernels.simd_path()}")
    bench_per_example("mlp", MLP, 64, 20 * k)
    bench_per_example("mlp", MLP, 256, 10 * k)
    bench_per_example("resnet18", resnet18_shapes(), 64, 2 * k)
    bench_agc("resnet50", 5 * k)
    bench_agc("gpt2", 2 * k)


if __name__ == "__main__":
    main()
