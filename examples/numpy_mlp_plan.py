"""Train a NumPy MLP whose gradient buffers are clipped in place by a clipcore.Plan.

    python examples/numpy_mlp_plan.py [--epochs 4] [--clip 1.0] [--lr 0.5]

The trainer allocates its gradient arrays once and the backward pass writes
into them (``out=``), so the buffers never move: a ``clipcore.Plan`` built
once over them validates and lays them out a single time, and every step's
``plan.clip_by_global_norm_(clip)`` goes straight to the fused kernels.

The data are synthetic (10 Gaussian classes in 784 dimensions, no download);
the network is the lesson's 784-256-128-10 MLP with ReLU and softmax
cross-entropy, trained with plain SGD.

Threads: NumPy's matrix products run on OpenBLAS's own thread pool, and
clipcore's OpenMP threads share the same cores. For 235,146 values one thread
clips in about 20 microseconds, and a second one must be woken at every step,
so the Plan here uses ``n_threads=1`` (``--n-threads 0`` for OpenMP's default).
"""
import argparse
import time

import numpy as np

import clipcore


def make_data(n_train, n_test, dim=784, classes=10, seed=0):
    """Noisy samples around one random center per class: (x, y) for training and testing."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n_train + n_test)
    x = centers[y] + 5.0 * rng.standard_normal((len(y), dim)).astype(np.float32)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class MLP:
    """ReLU MLP with softmax cross-entropy; gradients live in fixed buffers."""

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.weights = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
                        for a, b in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(b, np.float32) for b in sizes[1:]]
        self.grad_w = [np.zeros_like(w) for w in self.weights]
        self.grad_b = [np.zeros_like(b) for b in self.biases]

    def params(self):
        return [t for pair in zip(self.weights, self.biases) for t in pair]

    def grads(self):
        return [t for pair in zip(self.grad_w, self.grad_b) for t in pair]

    def forward(self, x):
        acts = [x]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0) if i < len(self.weights) - 1 else z)
        return acts

    def loss_and_grads(self, x, y):
        """Mean cross-entropy; the gradients are written into the fixed buffers."""
        acts = self.forward(x)
        logits = acts[-1] - acts[-1].max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
        delta = p
        delta[np.arange(len(y)), y] -= 1
        delta /= len(y)
        for i in reversed(range(len(self.weights))):
            np.dot(acts[i].T, delta, out=self.grad_w[i])
            np.sum(delta, axis=0, out=self.grad_b[i])
            if i:
                delta = (delta @ self.weights[i].T) * (acts[i] > 0)
        return float(loss)

    def accuracy(self, x, y):
        return float((self.forward(x)[-1].argmax(axis=1) == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--clip", type=float, default=1.0, help="clip_norm for the global norm")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-threads", type=int, default=1,
                    help="clipcore threads (0: what OpenMP may use)")
    args = ap.parse_args(argv)

    (x, y), (x_test, y_test) = make_data(4000, 1000)
    model = MLP([784, 256, 128, 10])
    plan = clipcore.Plan(model.grads(), n_threads=args.n_threads or None)  # once: they never move
    print(f"Plan over {len(plan)} gradient buffers, {plan.size} values; clip_norm {args.clip}")

    norms, after, steps, clipped = [], [], 0, 0
    first_loss = None
    t0 = time.perf_counter()
    rng = np.random.default_rng(2)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(y))
        losses = []
        for start in range(0, len(y), args.batch):
            idx = order[start:start + args.batch]
            losses.append(model.loss_and_grads(x[idx], y[idx]))
            norm = plan.clip_by_global_norm_(args.clip)
            norms.append(norm)
            after.append(plan.global_norm())
            clipped += norm > args.clip
            steps += 1
            for p, g in zip(model.params(), model.grads()):
                p -= args.lr * g
        first_loss = first_loss if first_loss is not None else losses[0]
        print(f"epoch {epoch}: mean loss {np.mean(losses):.4f}, "
              f"test accuracy {model.accuracy(x_test, y_test):.3f}")
    elapsed = time.perf_counter() - t0

    final_loss = model.loss_and_grads(x, y)
    print(f"first batch loss {first_loss:.4f}, final training loss {final_loss:.4f}")
    print(f"final test accuracy {model.accuracy(x_test, y_test):.3f}")
    print(f"clipped {clipped} of {steps} steps")
    print(f"global norm before clipping: median {np.median(norms):.4f}, max {max(norms):.4f}")
    print(f"largest global norm after clipping: {max(after):.6f} (clip_norm {args.clip})")
    print(f"trained in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
