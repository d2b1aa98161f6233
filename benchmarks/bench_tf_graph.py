"""clipcore inside tf.function and Keras's fit, against TensorFlow's own clipping.

Not run by the tests. Run it alone on an idle machine (other work on the
cores moves every figure):

    PYTHONPATH=. python benchmarks/bench_tf_graph.py [--quick] [--rounds N] [--only PART]
                                                   [--workloads mlp,2000x512,resnet50,gpt2]

Every comparison runs three compiled steps that differ only in the clipping:

  none      the same step with the clipping left out (same inputs, same
            outputs: the tensors through tf.identity_n, and a constant in place
            of the norm)
  clipcore  clipcore.clip_by_global_norm / clipcore.keras.with_global_clipnorm
  tf        tf.clip_by_global_norm / Keras's global_clipnorm

timed in alternating rounds (none, clipcore, tf, none, ...; the order
rotates each round), so that changes in the machine's load hit all three.
For each it prints the whole step's median and range over the rounds, and
the clipping's own cost: per round, (the step with the clip) minus (the step
without it), median and range. The ratios are TF / clipcore (above 1:
clipcore is faster), of the clipping's costs and of the whole steps.

* the clipping alone inside tf.function, on the gradient shapes of
  clipcore.workloads (MNIST MLP, 2000x512, ResNet-50, GPT-2), the gradients
  captured by the function (as a train step's are made inside it) and, for
  the small workloads, passed as arguments (tf.function's per-argument and
  per-result cost, which the step without the clip pays too);
* the same clip, its own time: a function of 11 clips in a chain (for
  the large workloads: 3), each to half the clip_norm of the one before, so
  that every clip scales every tensor, minus a function of 1, per clip; the
  call's fixed costs (arguments, results) cancel, which the "none" step
  leaves noisy; and beside them a floor: the same chain of clipcore's op
  over as many one-element tensors, to a clip_norm so large that nothing is
  scaled (the outputs are the inputs). That is TensorFlow's executor's cost
  of N tensors into and out of one op, and the op's own cost per tensor,
  without the arithmetic: TF / floor is the most clipcore's op can gain on
  TF's clip while the executor hands it N tensors;
* a training step compiled with tf.function: a GradientTape over a model of
  2000 variables of 512, the clip, and SGD (assign_sub per variable); and
  the clip's own cost in that step, on the tape's gradients: the step with
  11 chained clips minus the step with 1, per clip, as for the chain above;
* one training step of ``model.fit`` (graph mode: fit compiles its train
  step) with SGD(0.01) clipping at 15, for the lesson's MLP (784-256-128-10,
  batch 32) and for a model of 2000 weight vectors of 512 (batch 32);
* eager calls on a small TF tensor, without and with a recording tape (the
  cost of the dispatch and of the custom-gradient wrapper; no "none" step).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import clipcore  # noqa: E402
import clipcore.keras  # noqa: E402
from clipcore import workloads  # noqa: E402

tf.get_logger().setLevel("ERROR")     # each chain is a function of its own: no retracing notes

MODES = ("none", "clipcore", "tf")


def rounds(fns, n_rounds, number):
    """{mode: [seconds per call, one per round]}: the modes alternated, order rotating."""
    for fn in fns.values():
        fn()                               # warm-up (traces, compiles)
    times = {mode: [] for mode in fns}
    order = list(fns)
    for r in range(n_rounds):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            fn = fns[mode]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[mode].append((time.perf_counter() - t0) / number)
    return times


def _fmt(values, unit=1e3):
    return (f"{statistics.median(values) * unit:8.3f} "
            f"[{min(values) * unit:7.3f}, {max(values) * unit:8.3f}]")


def report(what, times):
    """The whole steps, the clipping's costs (step minus the step without it), the ratios."""
    none = times["none"]
    cost = {m: [t - n for t, n in zip(times[m], none)] for m in ("clipcore", "tf")}
    print(f"{what}  ({len(none)} rounds; ms, median [range])")
    for mode in MODES:
        extra = f"   clip cost {_fmt(cost[mode])}" if mode in cost else ""
        print(f"  {mode:9s} step {_fmt(times[mode])}{extra}")
    med = {m: statistics.median(v) for m, v in cost.items()}
    step_ratio = statistics.median(times["tf"]) / statistics.median(times["clipcore"])
    clip_ratio = med["tf"] / med["clipcore"] if med["clipcore"] > 0 else float("inf")
    print(f"  TF / clipcore: clip cost {clip_ratio:6.2f}x   whole step {step_ratio:5.2f}x",
          flush=True)


# -------------------------------------------------------------- clipping

def _no_clip(ts, clip_norm):
    # one op that passes the tensors through, as the clips pass them through one
    # op or more: the executor's cost per input and output is in both
    return tf.identity_n(list(ts)), tf.constant(0.0, ts[0].dtype)


CLIPS = {"none": _no_clip, "clipcore": clipcore.clip_by_global_norm,
         "tf": tf.clip_by_global_norm}


def _compiled(clip, captured=None):
    """tf.function of clip(ts, 1.0): of captured tensors (no arguments), or of its argument."""
    # a closure, not a default argument: tf.function would trace the function
    # passed as an argument, not call it
    if captured is not None:
        return tf.function(lambda: clip(captured, 1.0))
    return tf.function(lambda ts: clip(ts, 1.0))


def bench_clip(args):
    print("clip_by_global_norm inside tf.function (clip_norm 1.0: every tensor scaled)")
    for name in args.workloads:
        grads = [tf.constant(g) for g in workloads.make_gradients(name)]
        big = workloads.n_values(name) > 10_000_000
        number = 1 if big else (5 if name == "2000x512" else 50)
        # the results are materialised: .numpy() of the norm ends each call
        captured = {m: _compiled(clip, grads) for m, clip in CLIPS.items()}
        report(f"{name}, gradients captured", rounds(
            {m: (lambda f=f: f()[1].numpy()) for m, f in captured.items()},
            args.rounds, number))
        if not big:
            as_args = {m: _compiled(clip) for m, clip in CLIPS.items()}
            report(f"{name}, gradients as arguments", rounds(
                {m: (lambda f=f: f(grads)[1].numpy()) for m, f in as_args.items()},
                args.rounds, number))
        del grads, captured


def _clip_chain(clip, ts, k):
    """k clips in a chain, each of the one before's results, to half its clip_norm:
    every clip scales every tensor (to the same clip_norm, every clip after the
    first would find nothing to clip, and clipcore's would write nothing)."""
    total = tf.constant(0.0)
    for j in range(k):
        ts, norm = clip(ts, 0.5 ** j)
        total += norm
    return ts, total


def _chained(clip, grads, k):
    """tf.function of k clips in a chain."""
    return tf.function(lambda: _clip_chain(clip, list(grads), k)[1])


def report_chain(what, times, k):
    """One clip's cost from rounds of {(mode, 1): ..., (mode, 1 + k): ...}: per round,
    (the function with 1 + k clips - the one with 1) / k; median, range, TF / clipcore
    (and TF / floor when the rounds have a floor)."""
    modes = [m for m in ("clipcore", "tf", "floor") if (m, 1) in times]
    per = {m: [(a - b) / k for a, b in zip(times[(m, 1 + k)], times[(m, 1)])] for m in modes}
    med = {m: statistics.median(v) for m, v in per.items()}
    lines = [f"  {m:8s} {_fmt(per[m])}" for m in modes]
    lines.append(f"  TF / clipcore: {med['tf'] / med['clipcore']:6.2f}x")
    if "floor" in med:
        lines.append(f"  TF / floor:    {med['tf'] / med['floor']:6.2f}x (the most the op can gain)")
    print(f"{what}  ({len(per['tf'])} rounds; ms per clip, median [range])\n"
          + "\n".join(lines), flush=True)


def _pass_through(ts, clip_norm):
    # clip_norm a power of two far above the norm: the factor is exactly 1 and
    # clipcore's op returns its inputs
    return clipcore.clip_by_global_norm(ts, clip_norm * 2.0 ** 100)


def bench_chain(args, extra=10):
    print(f"one clip_by_global_norm inside tf.function: (a function of {1 + extra} clips in a "
          f"chain minus one of 1) / {extra}: the call's fixed costs cancel")
    for name in args.workloads:
        grads = [tf.constant(g) for g in workloads.make_gradients(name)]
        big = workloads.n_values(name) > 10_000_000
        k = 2 if big else extra
        ones = [tf.ones([1], g.dtype) for g in grads]
        fns = {}
        for mode, clip, ts in (("clipcore", CLIPS["clipcore"], grads),
                               ("tf", CLIPS["tf"], grads), ("floor", _pass_through, ones)):
            for n in (1, 1 + k):
                f = _chained(clip, ts, n)
                fns[(mode, n)] = lambda f=f: f().numpy()
        report_chain(name, rounds(fns, args.rounds,
                                  1 if big else (4 if name == "2000x512" else 20)), k)
        del grads, ones, fns


def bench_tape_step(args, n_vars=2000, size=512, batch=32):
    print(f"tf.function training step: GradientTape over {n_vars} variables of {size}, "
          f"clip, SGD")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, size)).astype(np.float32))
    # a target the weights converge to: no decay towards denormals in any mode
    y = tf.constant(rng.normal(size=(batch, n_vars)).astype(np.float32))

    def make(clip, k=1):
        vs = [tf.Variable(rng.normal(size=size).astype(np.float32) * 0.05)
              for _ in range(n_vars)]

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                logits = tf.matmul(x, tf.stack(vs), transpose_b=True)
                loss = tf.reduce_mean(tf.square(logits - y))
            grads, _ = _clip_chain(clip, tape.gradient(loss, vs), k)
            for v, g in zip(vs, grads):
                v.assign_sub(0.01 * g)
            return loss
        return lambda: step().numpy()
    report(f"{n_vars}x{size} tape step", rounds({m: make(c) for m, c in CLIPS.items()},
                                                 args.rounds, 3))
    k = 10
    report_chain(f"{n_vars}x{size} tape step, one clip of the tape's gradients: (the step "
                 f"with {1 + k} chained clips minus the step with 1) / {k}",
                 rounds({(m, n): make(CLIPS[m], n) for m in ("clipcore", "tf")
                         for n in (1, 1 + k)}, args.rounds, 3), k)


# ----------------------------------------------------------------- eager

def bench_eager(args):
    print("eager calls on a TF tensor of 1000 float32 (dispatch and tape wrapper), us")
    x = tf.random.normal([1000])
    cases = (("relu, no tape", lambda: clipcore.relu(x), lambda: tf.nn.relu(x)),
             ("clip_by_norm, no tape", lambda: clipcore.clip_by_norm(x, 1.0),
              lambda: tf.clip_by_norm(x, 1.0)))
    for what, cc, ref in cases:
        times = rounds({"clipcore": cc, "tf": ref}, args.rounds, 500)
        print(f"  {what:24s} clipcore {_fmt(times['clipcore'], 1e6)}   "
              f"TF {_fmt(times['tf'], 1e6)}", flush=True)
    with tf.GradientTape() as tape:
        tape.watch(x)
        times = rounds({"clipcore": lambda: clipcore.relu(x), "tf": lambda: tf.nn.relu(x)},
                       args.rounds, 200)
    print(f"  {'relu, tape recording':24s} clipcore {_fmt(times['clipcore'], 1e6)}   "
          f"TF {_fmt(times['tf'], 1e6)}", flush=True)


# ------------------------------------------------------------------- fit

class ManyVectors(keras.layers.Layer):
    """2000 weight vectors of 512: y = x @ stack(vectors).T, then 10 of them."""

    def build(self, input_shape):
        self.vs = [self.add_weight(shape=(512,), initializer="random_normal", name=f"v{i}")
                   for i in range(2000)]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 10)

    def call(self, x):
        stacked = keras.ops.stack([v.value for v in self.vs])
        return keras.ops.matmul(x, keras.ops.transpose(stacked))[:, :10]


def mlp():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")])


def many():
    return keras.Sequential([keras.Input((512,)), ManyVectors(),
                             keras.layers.Activation("softmax")])


# A small learning rate, so that the step without clipping does not diverge
# (NaN and denormal arithmetic would time differently). Keras multiplies
# every gradient whether or not the norm exceeds clip_norm; clipcore writes
# only when it does (the outputs are the inputs otherwise).
OPTIMIZERS = {
    "none": lambda: keras.optimizers.SGD(0.01),
    "clipcore": lambda: clipcore.keras.with_global_clipnorm(keras.optimizers.SGD(0.01), 15),
    "tf": lambda: keras.optimizers.SGD(0.01, global_clipnorm=15),
}


def fit_step(make_model, optimizer, n_in, steps):
    """A function running `steps` training steps of model.fit; returns nothing."""
    keras.utils.set_random_seed(0)
    model = make_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * steps, n_in)).astype(np.float32)
    y = rng.integers(0, 10, 32 * steps)
    return lambda: model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)


def bench_fit(args):
    print("model.fit, per training step (graph mode), SGD(0.01) clipping at 15")
    for name, make, n_in, steps in (("MNIST MLP", mlp, 784, 50),
                                    ("2000x512 vectors", many, 512, 20)):
        fns = {m: fit_step(make, opt(), n_in, steps) for m, opt in OPTIMIZERS.items()}
        times = rounds(fns, max(3, args.rounds // 3), 1)
        report(f"fit step, {name}", {m: [t / steps for t in v] for m, v in times.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    parser.add_argument("--only", choices=["eager", "clip", "chain", "tape", "fit"],
                        default=None)
    parser.add_argument("--workloads", default="mlp,2000x512,resnet50,gpt2",
                        help="the clip's and the chain's workloads, comma-separated")
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    if args.rounds is None:
        args.rounds = 5 if args.quick else 21
    print(f"clipcore {clipcore.__file__}, TensorFlow {tf.__version__}, Keras {keras.__version__},"
          f" {os.cpu_count()} CPUs")
    for part, fn in (("eager", bench_eager), ("clip", bench_clip), ("chain", bench_chain),
                     ("tape", bench_tape_step), ("fit", bench_fit)):
        if args.only in (None, part):
            fn(args)


if __name__ == "__main__":
    main()
