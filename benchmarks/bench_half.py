"""16-bit (and float64) GPT-2 gradients: clipcore.torch.clip_grad_norm_ against torch's.

    python benchmarks/bench_half.py [--rounds 7] [--reps 3] [--threads 1,2]
                                    [--dtypes bfloat16,float16,float64] [--passes] [--numpy-ceiling]

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
The VM's bandwidth swings within seconds, so everything is timed in
--rounds rounds: in each round the ceiling, clipcore and torch take --reps
calls each in turn, and each ratio is taken within a round (the medians of
that round's calls); the table gives the median ratio over the rounds and
its range. Thread counts from --threads (torch.set_num_threads;
clipcore.torch follows torch's count). Targets: clipcore >= 0.9 of the
ceiling, and ahead of torch. Not run by the tests.

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
    """The median of reps calls, each on the saved gradients."""
    out = []
    for _ in range(reps):
        for p, s in zip(params, saved):
            p.grad.copy_(s)
        t0 = time.perf_counter()
        fn(params, max_norm)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def ceiling(buf, n_threads, reps):
    """Medians of reps probes: both passes together, the read pass, the read-write pass."""
    times = [bandwidth_probe(buf, n_threads) for _ in range(reps)]
    return (statistics.median(sum(t) for t in times),
            statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))


def rows(params, saved, max_norm, buf, n_threads, args):
    """One round: each row's median time; the rows are timed in turn."""
    total = torch.tensor(2.0 * max_norm)
    r = dict(zip(("ceiling", "ceil_read", "ceil_rw"), ceiling(buf, n_threads, args.reps)))
    r["clipcore"] = time_clip(cct.clip_grad_norm_, params, saved, max_norm, args.reps)
    r["torch"] = time_clip(torch.nn.utils.clip_grad_norm_, params, saved, max_norm, args.reps)
    if args.passes:   # the norm alone, and the scaling alone (by about 0.5)
        r["norm"] = time_clip(lambda ps, _: cct.get_total_norm([p.grad for p in ps]),
                              params, saved, max_norm, args.reps)
        r["scale"] = time_clip(lambda ps, m: cct.clip_grads_with_norm_(ps, m, total),
                               params, saved, max_norm, args.reps)
    return r


def spread(rounds, num, den):
    """The median over the rounds of num / den taken in each round, and its range."""
    ratios = [r[num] / r[den] for r in rounds]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="calls per row in each round")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="bfloat16,float16,float64")
    ap.add_argument("--passes", action="store_true",
                    help="also time the norm and the scaling apart")
    ap.add_argument("--numpy-ceiling", action="store_true",
                    help="measure the ceiling over a NumPy buffer (huge pages where granted)")
    args = ap.parse_args()
    print(f"clipcore simd {kernels.simd_path()}, torch {torch.__version__}; {args.rounds} rounds "
          f"of {args.reps} calls per row; ms: the median over the rounds of each round's median; "
          f"ratios: their median over the rounds (range)")
    print(f"{'dtype':9} {'thr':>3} {'MB':>6} {'ceiling':>8} {'clipcore':>9} {'torch':>8} "
          f"{'cc/ceil':>18} {'torch/cc':>18}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        params = gradients(dtype)
        saved = [p.grad.clone() for p in params]
        n_bytes = sum(p.grad.numel() for p in params) * params[0].grad.element_size()
        buf = (np.ones(n_bytes // 4, np.float32) if args.numpy_ceiling
               else torch.ones(n_bytes // 4).numpy())
        norm = float(torch.nn.utils.get_total_norm([p.grad.float() for p in params]))
        max_norm = 0.5 * norm                        # every call clips
        for n_threads in map(int, args.threads.split(",")):
            torch.set_num_threads(n_threads)
            rows(params, saved, max_norm, buf, n_threads, args)    # warm-up
            rounds = [rows(params, saved, max_norm, buf, n_threads, args)
                      for _ in range(args.rounds)]
            ms = {k: statistics.median(r[k] for r in rounds) * 1e3 for k in rounds[0]}
            print(f"{name:9} {n_threads:>3} {n_bytes / 1e6:>6.0f} {ms['ceiling']:>8.1f} "
                  f"{ms['clipcore']:>9.1f} {ms['torch']:>8.1f} "
                  f"{spread(rounds, 'ceiling', 'clipcore'):>18} "
                  f"{spread(rounds, 'torch', 'clipcore'):>18}", flush=True)
            if args.passes:
                print(f"{'':9} {'':>3} {'':>6} norm {ms['norm']:.1f} ms (read ceiling "
                      f"{ms['ceil_read']:.1f}: {spread(rounds, 'ceil_read', 'norm')}), scale "
                      f"{ms['scale']:.1f} ms (read-write ceiling {ms['ceil_rw']:.1f}: "
                      f"{spread(rounds, 'ceil_rw', 'scale')})", flush=True)
        del params, saved, buf


if __name__ == "__main__":
    main()
