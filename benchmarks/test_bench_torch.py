"""clipcore.torch.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on the core's workloads.

    pytest benchmarks/test_bench_torch.py --benchmark-only --benchmark-group-by=param:workload
    python benchmarks/test_bench_torch.py [--quick] [--workload NAME ...]   # medians + ratios

Gradients are restored from a saved copy before every timed call (not timed),
so each call clips the same unclipped gradients: "kept" copies into the same
gradient tensors (zero_grad(set_to_none=False)), "fresh" gives every
parameter a new gradient tensor (set_to_none=True, the default). Both
implementations share one OpenMP thread pool and run on
torch.get_num_threads() threads.
"""
import argparse
import statistics
import time

import pytest

torch = pytest.importorskip("torch")

import clipcore.torch as ct  # noqa: E402
from clipcore import workloads  # noqa: E402


WORKLOADS = {"2000x512": workloads.shapes("2000x512"), "mnist_mlp": workloads.shapes("mlp"),
             "resnet50": workloads.shapes("resnet50"), "gpt2": workloads.shapes("gpt2")}
SIZES = {"2000x512": (2000, 1_024_000), "mnist_mlp": (6, 235_146),
         "resnet50": (161, 25_557_032), "gpt2": (148, 124_439_808)}
NORM_TYPES = {"2": 2.0, "1": 1.0, "inf": float("inf")}
IMPLS = {"clipcore": ct.clip_grad_norm_, "torch": torch.nn.utils.clip_grad_norm_}


class Grads:
    """Parameters with float32 gradients and a saved copy to restore them from."""

    def __init__(self, shapes, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.params = []
        for shape in shapes:
            p = torch.nn.Parameter(torch.empty(shape))
            p.grad = torch.randn(shape, generator=gen)
            self.params.append(p)
        self.saved = [p.grad.clone() for p in self.params]

    def restore(self):
        """The same gradient tensors, their values reset."""
        with torch.no_grad():
            torch._foreach_copy_([p.grad for p in self.params], self.saved)

    def renew(self):
        """New gradient tensors, as after zero_grad(set_to_none=True) and backward."""
        for p in self.params:
            p.grad = None
        for p, s in zip(self.params, self.saved):
            p.grad = s.clone()


_cache = {}


def grads_for(workload):
    if workload not in _cache:
        _cache.clear()      # GPT-2's gradients and copy take 1 GB: keep one workload
        _cache[workload] = g = Grads(WORKLOADS[workload])
        assert (len(g.saved), sum(t.numel() for t in g.saved)) == SIZES[workload]
    return _cache[workload]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("grads", ["kept", "fresh"])
@pytest.mark.parametrize("norm_type", list(NORM_TYPES))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_clip_grad_norm(benchmark, workload, norm_type, grads, impl):
    g = grads_for(workload)
    fn, p = IMPLS[impl], NORM_TYPES[norm_type]
    benchmark.group = f"clip_grad_norm_ {workload} p={norm_type} {grads} grads"
    benchmark.extra_info.update(workload=workload, norm_type=norm_type, grads=grads, impl=impl)
    rounds = 10 if workload == "gpt2" else 30
    setup = g.restore if grads == "kept" else g.renew

    def call():
        return fn(g.params, 1.0, p)
    total = benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
    assert total.item() > 1.0       # the gradients were clipped, not already small


def median_times(fns, setup, repeat):
    """Median seconds per call of each fn, calls interleaved so load bursts hit all alike."""
    times = {name: [] for name in fns}
    for r in range(repeat + 2):
        for name, fn in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            if r >= 2:      # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS))
    ap.add_argument("--grads", action="append", choices=["kept", "fresh"])
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (both libraries)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; medians in ms")
    print(f"{'workload':10} {'grads':6} {'p':>3} {'torch':>9} {'clipcore':>9} {'speed-up':>9}"
          f" {'vs p=2':>7}")
    for workload in args.workload or list(WORKLOADS):
        g = grads_for(workload)
        repeat = (3 if args.quick else 10) if workload == "gpt2" else (15 if args.quick else 60)
        for grads in args.grads or ["kept", "fresh"]:
            base = None
            for name, p in NORM_TYPES.items():
                fns = {impl: (lambda fn=fn, p=p: fn(g.params, 1.0, p))
                       for impl, fn in IMPLS.items()}
                t = median_times(fns, g.restore if grads == "kept" else g.renew, repeat)
                base = base or t["clipcore"]
                print(f"{workload:10} {grads:6} {name:>3} {t['torch'] * 1e3:9.3f}"
                      f" {t['clipcore'] * 1e3:9.3f} {t['torch'] / t['clipcore']:8.1f}x"
                      f" {t['clipcore'] / base:7.2f}", flush=True)


if __name__ == "__main__":
    main()
