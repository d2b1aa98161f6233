"""A Lightning training step with and without clipcore.torch.patch().

    python benchmarks/bench_torch_trainers.py [--params 2000] [--size 512] [--steps 300]
                                              [--algorithm norm] [--threads 1 2]

The model has --params parameters of --size float32 values each (default
2000 x 512, the many-small-tensors case where torch's per-tensor work shows),
its forward one multiply-add per parameter; Lightning's automatic
optimization runs SGD with Trainer(gradient_clip_val=0.5). For each thread
count the two modes alternate in blocks (unpatched, patched, patched,
unpatched, ...: each block a fit of its own) so drifts in the machine's load
hit both; each reports, over the timed steps of all blocks after a warm-up:

  step   on_train_batch_start to on_train_batch_end (forward, backward,
         clipping, SGD update)
  clip   Lightning's clip_gradients call alone (what patch() changes)

Medians and [ranges of the per-block medians], in milliseconds; the ratios
torch / clipcore (above 1: patched is faster) of the medians and, in
brackets, the range of the per-block-pair ratios. Not run by the tests.
"""
import argparse
import logging
import statistics
import time
import warnings

import torch
import lightning.pytorch as pl

import clipcore.torch as ct


class ManyParams(pl.LightningModule):
    def __init__(self, n_params, size):
        super().__init__()
        torch.manual_seed(0)
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(size) * 0.01)
                                         for _ in range(n_params))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out = x
        for p in self.ps:
            out = out * 0.999 + p
        return (out * out).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Timer(pl.Callback):
    """Per-step times, and the time of the precision plugin's clip_gradients."""

    def __init__(self):
        self.steps, self.clips = [], []

    def on_fit_start(self, trainer, module):
        plugin = trainer.precision_plugin
        clip = plugin.clip_gradients

        def timed(*args, **kwargs):
            t = time.perf_counter()
            clip(*args, **kwargs)
            self.clips.append(time.perf_counter() - t)
        plugin.clip_gradients = timed

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self._t)


def run(args, steps):
    module = ManyParams(args.params, args.size)
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=0.5,
                         gradient_clip_algorithm=args.algorithm, callbacks=[timer])
    data = torch.utils.data.TensorDataset(torch.randn(steps * 8, args.size))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return timer


def block_medians(blocks):
    """The median of each block's timed steps."""
    return [statistics.median(b) for b in blocks]


def bench(args, threads):
    torch.set_num_threads(threads)
    per_run = max(1, args.steps // args.blocks)
    # {mode: ([step times per block], [clip times per block])}
    times = {"torch": ([], []), "clipcore": ([], [])}
    for b in range(args.blocks):
        for mode in (("torch", "clipcore") if b % 2 == 0 else ("clipcore", "torch")):
            if mode == "clipcore":
                with ct.patch():
                    timer = run(args, per_run + args.warmup)
            else:
                timer = run(args, per_run + args.warmup)
            times[mode][0].append(timer.steps[args.warmup:])
            times[mode][1].append(timer.clips[args.warmup:])

    print(f"Lightning step, {args.params} parameters x {args.size} float32, "
          f"gradient_clip_algorithm={args.algorithm!r}, {torch.get_num_threads()} threads, "
          f"{args.blocks} blocks of {per_run} steps per mode (ms)")
    print(f"{'':10s} {'step median [block range]':>32s} {'clip median [block range]':>32s}")
    for mode, (steps, clips) in times.items():
        cells = []
        for blocks in (steps, clips):
            meds = block_medians(blocks)
            every = [t for blk in blocks for t in blk]
            cells.append(f"{statistics.median(every) * 1e3:9.3f} "
                         f"[{min(meds) * 1e3:8.3f}, {max(meds) * 1e3:8.3f}]")
        print(f"{mode:10s} {cells[0]:>32s} {cells[1]:>32s}")
    cells = []
    for k in (0, 1):
        ref, got = times["torch"][k], times["clipcore"][k]
        med = (statistics.median([t for blk in ref for t in blk])
               / statistics.median([t for blk in got for t in blk]))
        pairs = [a / b for a, b in zip(block_medians(ref), block_medians(got))]
        cells.append(f"{med:8.2f}x [{min(pairs):5.2f}, {max(pairs):5.2f}]")
    print(f"{'ratio':10s} {cells[0]:>32s} {cells[1]:>32s}   (torch / clipcore)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    parser.add_argument("--blocks", type=int, default=4, help="alternating runs per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--algorithm", choices=["norm", "value"], default="norm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch's intra-op thread counts to run, one after the other")
    args = parser.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    for threads in args.threads:
        bench(args, threads)


if __name__ == "__main__":
    main()
