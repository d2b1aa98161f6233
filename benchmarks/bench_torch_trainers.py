"""A Lightning training step with and without clipcore.torch.patch().

    python benchmarks/bench_torch_trainers.py [--params 2000] [--size 512] [--steps 300]
                                              [--algorithm norm] [--threads N]

The model has --params parameters of --size float32 values each (default
2000 x 512, the many-small-tensors case where torch's per-tensor work shows),
its forward one multiply-add per parameter; Lightning's automatic
optimization runs SGD with Trainer(gradient_clip_val=0.5). The two runs
alternate in blocks (unpatched, patched, unpatched, ...) so drifts in the
machine's load hit both; each reports, over all timed steps after a warm-up:

  step   on_train_batch_start to on_train_batch_end (forward, backward,
         clipping, SGD update)
  clip   Lightning's clip_gradients call alone (what patch() changes)

Medians, in milliseconds; torch's intra-op threads as --threads (default:
torch's own choice). Not run by the tests.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    parser.add_argument("--blocks", type=int, default=3, help="alternating runs per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--algorithm", choices=["norm", "value"], default="norm")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    per_run = max(1, args.steps // args.blocks)
    times = {"torch": ([], []), "clipcore": ([], [])}
    for _ in range(args.blocks):
        for mode in times:
            if mode == "clipcore":
                with ct.patch():
                    timer = run(args, per_run + args.warmup)
            else:
                timer = run(args, per_run + args.warmup)
            times[mode][0].extend(timer.steps[args.warmup:])
            times[mode][1].extend(timer.clips[args.warmup:])

    print(f"Lightning step, {args.params} parameters x {args.size} float32, "
          f"gradient_clip_algorithm={args.algorithm!r}, {torch.get_num_threads()} threads, "
          f"{len(times['torch'][0])} steps each (medians, ms)")
    print(f"{'':10s} {'step':>9s} {'clip':>9s}")
    med = {mode: (statistics.median(s) * 1e3, statistics.median(c) * 1e3)
           for mode, (s, c) in times.items()}
    for mode, (step, clip) in med.items():
        print(f"{mode:10s} {step:9.3f} {clip:9.3f}")
    (ts, tc), (cs, cc) = med["torch"], med["clipcore"]
    print(f"{'ratio':10s} {ts / cs:8.2f}x {tc / cc:8.2f}x   (torch / clipcore)")


if __name__ == "__main__":
    main()
