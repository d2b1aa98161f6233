"""clipcore inside tf.function and Keras's fit, against TensorFlow's own clipping.

Not run by the tests. Run it alone on an idle machine (other work on the
cores moves every figure):

    PYTHONPATH=. python benchmarks/bench_tf_graph.py [--quick]

Prints medians and ratios (clipcore time / TF time: below 1 is faster) for

* one training step of ``model.fit`` (graph mode: fit compiles its train
  step) with ``clipcore.keras.with_global_clipnorm(SGD(1.0), 15)`` against
  ``SGD(1.0, global_clipnorm=15)``, for the lesson's MLP (784-256-128-10,
  batch 32) and for a model of 2000 weight vectors of 512 (batch 32);
* the clipping alone, ``clipcore.clip_by_global_norm`` against
  ``tf.clip_by_global_norm``, both inside ``tf.function``, on the gradient
  shapes of clipcore.workloads (MNIST MLP, 2000x512, ResNet-50, GPT-2): the
  gradients passed as arguments, then captured by the function (tf.function
  has a cost of its own per argument and per result; with 2000 tensors that
  is most of either side's time, and neither side can avoid it);
* eager calls on a small TF tensor, without and with a recording tape (the
  cost of the dispatch and of the custom-gradient wrapper).
"""
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import clipcore  # noqa: E402
import clipcore.keras  # noqa: E402
from clipcore import workloads  # noqa: E402

QUICK = "--quick" in sys.argv


def median_time(fn, repeats, number=1):
    fn()                                   # warm-up (traces, compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def row(what, t_cc, t_tf, unit=1e3, label="ms"):
    print(f"{what:<38} clipcore {t_cc * unit:9.3f} {label}   TF {t_tf * unit:9.3f} {label}   "
          f"ratio {t_cc / t_tf:5.2f}", flush=True)


# ------------------------------------------------------------------- fit

class ManyVectors(keras.layers.Layer):
    """2000 weight vectors of 512: y = x @ stack(vectors).T, then 10 of them."""

    def build(self, input_shape):
        self.vs = [self.add_weight(shape=(512,), initializer="random_normal", name=f"v{i}")
                   for i in range(2000)]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 10)

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(keras.ops.stack([v.value for v in self.vs])))[:, :10]


def mlp():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")])


def many():
    return keras.Sequential([keras.Input((512,)), ManyVectors(),
                             keras.layers.Activation("softmax")])


def fit_step_time(make_model, optimizer, n_in, steps, repeats):
    keras.utils.set_random_seed(0)
    model = make_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * steps, n_in)).astype(np.float32)
    y = rng.integers(0, 10, 32 * steps)
    return median_time(lambda: model.fit(x, y, batch_size=32, epochs=1, shuffle=False,
                                         verbose=0), repeats) / steps


def bench_fit():
    print("model.fit, per training step (graph mode), with_global_clipnorm vs global_clipnorm")
    for name, make, n_in, steps in (("MNIST MLP", mlp, 784, 50), ("2000x512 vectors", many, 512, 20)):
        reps = 3 if QUICK else 7
        t_cc = fit_step_time(make, clipcore.keras.with_global_clipnorm(
            keras.optimizers.SGD(1.0), 15), n_in, steps, reps)
        t_tf = fit_step_time(make, keras.optimizers.SGD(1.0, global_clipnorm=15), n_in, steps,
                             reps)
        row(f"fit step, {name}", t_cc, t_tf)


# -------------------------------------------------------------- clipping

def bench_clip():
    print("clip_by_global_norm inside tf.function (clip_norm 1.0: every tensor scaled)")
    cc = tf.function(lambda ts: clipcore.clip_by_global_norm(ts, 1.0))
    ref = tf.function(lambda ts: tf.clip_by_global_norm(ts, 1.0))
    for name in ("mlp", "2000x512", "resnet50", "gpt2"):
        grads = [tf.constant(g) for g in workloads.make_gradients(name)]
        big = workloads.n_values(name) > 10_000_000
        reps, number = (5, 1) if big else (15, 5 if name == "2000x512" else 50)
        if QUICK:
            reps = 3
        # the results are materialised: .numpy() of the norm ends the step
        t_cc = median_time(lambda: cc(grads)[1].numpy(), reps, number)
        t_tf = median_time(lambda: ref(grads)[1].numpy(), reps, number)
        row(f"tf.function clip, {name}", t_cc, t_tf)
        # the gradients captured (as a train step's are made inside it): no
        # per-argument cost of tf.function's call, which both sides pay above
        cc_in = tf.function(lambda: clipcore.clip_by_global_norm(grads, 1.0))
        ref_in = tf.function(lambda: tf.clip_by_global_norm(grads, 1.0))
        t_cc = median_time(lambda: cc_in()[1].numpy(), reps, number)
        t_tf = median_time(lambda: ref_in()[1].numpy(), reps, number)
        row(f"  captured, {name}", t_cc, t_tf)
        del grads, cc_in, ref_in


def bench_eager():
    print("eager calls on a TF tensor of 1000 float32 (dispatch and tape wrapper)")
    x = tf.random.normal([1000])
    t_plain = median_time(lambda: clipcore.relu(x), 7, 2000)
    t_tf = median_time(lambda: tf.nn.relu(x), 7, 2000)
    row("relu, no tape", t_plain, t_tf, 1e6, "us")
    with tf.GradientTape() as tape:
        tape.watch(x)
        t_tape = median_time(lambda: clipcore.relu(x), 7, 500)
        t_tf_tape = median_time(lambda: tf.nn.relu(x), 7, 500)
    row("relu, tape recording", t_tape, t_tf_tape, 1e6, "us")
    t_clip = median_time(lambda: clipcore.clip_by_norm(x, 1.0), 7, 2000)
    t_tfclip = median_time(lambda: tf.clip_by_norm(x, 1.0), 7, 2000)
    row("clip_by_norm, no tape", t_clip, t_tfclip, 1e6, "us")


if __name__ == "__main__":
    print(f"clipcore {clipcore.__file__}, TensorFlow {tf.__version__}, Keras {keras.__version__},"
          f" {os.cpu_count()} CPUs")
    bench_eager()
    bench_clip()
    bench_fit()
