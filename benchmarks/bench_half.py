"""16-bit (and float64) GPT-2 gradients: clipcore.torch.clip_grad_norm_ against torch's.

    python benchmarks/bench_half.py [--reps 7] [--threads 1,2] [--dtypes bfloat16,float16,float64]
                                    [--passes] [--numpy-ceiling]

For each dtype, GPT-2 small's 148 gradient tensors (clipcore.workloads'
shapes, 124,439,808 values) are clipped by clipcore.torch.clip_grad_norm_ and
by torch.nn.utils.clip_grad_norm_, on the same tensors, restored from a copy
before every call (so every call clips: a read pass and a read-write pass),
and compared with the bandwidth ceiling for the same bytes:
clipcore.bench._probe.bandwidth_probe's read pass plus read-write pass over a
float32 buffer of as many bytes (half as many elements for the 16-bit
types, twice as many for float64), allocated by torch as the gradients are.
(NumPy asks for transparent huge pages for large arrays, torch does not
unless THP_MEM_ALLOC_ENABLE=1 is set, and on small pages the same loop
streams more slowly: --numpy-ceiling measures over a NumPy buffer instead.)
Medians of --reps calls, at each thread count of --threads
(torch.set_num_threads; clipcore.torch follows torch's count). Targets:
clipcore >= 0.9 of the ceiling, and ahead of torch. Not run by the tests.

With --passes, the two passes are also timed apart, each against its own
part of the ceiling: the norm alone (clipcore.torch.get_total_norm) against
the probe's read pass, and the scaling alone (clipcore.torch.clip_grads_with_norm_,
by about 0.5) against its read-write pass.
"""
import argparse
import statistics
import time

import numpy as np
import torch

import clipcore
import clipcore.torch as cct
from clipcore import kernels, workloads
from clipcore.bench._probe import bandwidth_probe


def gradients(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in workloads.shapes("gpt2"):
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        params.append(p)
    return params


def time_clip(fn, params, saved, max_norm, reps):
    out = []
    for _ in range(reps + 1):                     # the first call warms up
        for p, s in zip(params, saved):
            p.grad.copy_(s)
        t0 = time.perf_counter()
        fn(params, max_norm)
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def ceiling(n_bytes, n_threads, reps, numpy_buffer=False):
    """Medians of the probe's two passes together, of its read pass and of its
    read-write pass, over n_bytes (allocated by torch, or by NumPy)."""
    buf = np.ones(n_bytes // 4, np.float32) if numpy_buffer else torch.ones(n_bytes // 4).numpy()
    times = [bandwidth_probe(buf, n_threads) for _ in range(reps + 1)][1:]
    return (statistics.median(sum(t) for t in times),
            statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))


def passes(params, saved, max_norm, reps):
    """Medians of the norm alone and of the scaling alone (by about 0.5)."""
    total = torch.tensor(2.0 * max_norm)
    norm = time_clip(lambda ps, _: cct.get_total_norm([p.grad for p in ps]), params, saved,
                     max_norm, reps)
    scale = time_clip(lambda ps, m: cct.clip_grads_with_norm_(ps, m, total), params, saved,
                      max_norm, reps)
    return norm, scale


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="bfloat16,float16,float64")
    ap.add_argument("--passes", action="store_true",
                    help="also time the norm and the scaling apart")
    ap.add_argument("--numpy-ceiling", action="store_true",
                    help="measure the ceiling over a NumPy buffer (huge pages where granted)")
    args = ap.parse_args()
    print(f"clipcore {clipcore.__version__ if hasattr(clipcore, '__version__') else ''} "
          f"simd {kernels.simd_path()}, torch {torch.__version__}; medians of {args.reps}, ms")
    print(f"{'dtype':9} {'thr':>3} {'MB':>6} {'ceiling':>8} {'clipcore':>9} {'torch':>8} "
          f"{'cc/ceil':>8} {'torch/cc':>8}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        params = gradients(dtype)
        saved = [p.grad.clone() for p in params]
        n_bytes = sum(p.grad.numel() for p in params) * params[0].grad.element_size()
        norm = float(torch.nn.utils.get_total_norm([p.grad.float() for p in params]))
        max_norm = 0.5 * norm                        # every call clips
        for n_threads in map(int, args.threads.split(",")):
            torch.set_num_threads(n_threads)
            ceil, ceil_read, ceil_rw = ceiling(n_bytes, n_threads, args.reps, args.numpy_ceiling)
            ours = time_clip(cct.clip_grad_norm_, params, saved, max_norm, args.reps)
            theirs = time_clip(torch.nn.utils.clip_grad_norm_, params, saved, max_norm,
                               args.reps)
            print(f"{name:9} {n_threads:>3} {n_bytes / 1e6:>6.0f} {ceil * 1e3:>8.1f} "
                  f"{ours * 1e3:>9.1f} {theirs * 1e3:>8.1f} {ceil / ours:>8.2f} "
                  f"{theirs / ours:>8.2f}", flush=True)
            if args.passes:
                norm, scale = passes(params, saved, max_norm, args.reps)
                print(f"{'':9} {'':>3} {'':>6} norm {norm * 1e3:.1f} ms (read ceiling "
                      f"{ceil_read * 1e3:.1f}: {ceil_read / norm:.2f}), scale {scale * 1e3:.1f} ms "
                      f"(read-write ceiling {ceil_rw * 1e3:.1f}: {ceil_rw / scale:.2f})",
                      flush=True)
        del params, saved


if __name__ == "__main__":
    main()
