"""A TensorFlow custom training loop (GradientTape) that clips with clipcore.clip_by_global_norm.

    python examples/tf_custom_loop.py [--epochs 3] [--clip 1.0] [--lr 0.2]

``clipcore.clip_by_global_norm(grads, clip_norm)`` takes the place of
``tf.clip_by_global_norm(grads, clip_norm)``: same arguments, same
``(clipped_list, global_norm)`` result, TF tensors in and TF tensors out. The
loop runs eagerly (clipcore works on the tensors' memory, not inside a
``tf.function`` graph) and checks once, on the first step, that it gives
TensorFlow's answer.

The data are synthetic (10 Gaussian classes in 784 dimensions, no download);
the model is the lesson's 784-256-128-10 MLP, trained with plain SGD.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import clipcore  # noqa: E402


def make_data(n_train, n_test, dim=784, classes=10, seed=0):
    """Noisy samples around one random center per class: (x, y) for training and testing."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n_train + n_test)
    x = centers[y] + 5.0 * rng.standard_normal((len(y), dim)).astype(np.float32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)

    tf.random.set_seed(0)
    (x, y), (x_test, y_test) = make_data(4000, 1000)
    model = tf.keras.Sequential([tf.keras.Input((784,)),
                                 tf.keras.layers.Dense(256, activation="relu"),
                                 tf.keras.layers.Dense(128, activation="relu"),
                                 tf.keras.layers.Dense(10)])
    opt = tf.keras.optimizers.SGD(learning_rate=args.lr)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def accuracy(xs, ys):
        return float(np.mean(np.argmax(model(xs, training=False).numpy(), axis=1) == ys))

    norms, steps, clipped, first_loss = [], 0, 0, None
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(y))
        losses = []
        for start in range(0, len(y), args.batch):
            idx = order[start:start + args.batch]
            with tf.GradientTape() as tape:
                loss = loss_fn(y[idx], model(x[idx], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            clipped_grads, norm = clipcore.clip_by_global_norm(grads, args.clip)
            if steps == 0:
                tf_grads, tf_norm = tf.clip_by_global_norm(grads, args.clip)
                diff = max(float(tf.reduce_max(tf.abs(a - b)))
                           for a, b in zip(clipped_grads, tf_grads))
                print(f"first step: clipcore norm {float(norm):.6f}, "
                      f"tf norm {float(tf_norm):.6f}")
                print(f"first step: output types {sorted({type(g).__name__ for g in clipped_grads})}"
                      f", max |clipcore - tf| {diff:.3g}")
            opt.apply_gradients(zip(clipped_grads, model.trainable_variables))
            norms.append(float(norm))
            clipped += float(norm) > args.clip
            steps += 1
            losses.append(float(loss))
        first_loss = first_loss if first_loss is not None else losses[0]
        print(f"epoch {epoch}: mean loss {np.mean(losses):.4f}, "
              f"test accuracy {accuracy(x_test, y_test):.3f}")
    elapsed = time.perf_counter() - t0

    final_loss = float(loss_fn(y, model(x, training=False)))
    print(f"first batch loss {first_loss:.4f}, final training loss {final_loss:.4f}")
    print(f"final test accuracy {accuracy(x_test, y_test):.3f}")
    print(f"clipped {clipped} of {steps} steps")
    print(f"global norm before clipping: median {np.median(norms):.4f}, max {max(norms):.4f}")
    print(f"trained in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
