"""``python -m clipcore demo``: the lesson's exploding gradients, fixed by clipping.

The MLP 784-256-128-10 is trained with plain SGD at lr=1, twice from the same
initial weights on the same data: first without clipping (the loss turns
non-finite within the first epoch), then with
``clipcore.clip_by_global_norm_(grads, 15)`` before every update (the loss
stays finite and the accuracy climbs).

Everything but the clipping is NumPy: forward and backward passes, the data
(28x28 synthetic "digits" generated here, deterministically: ten stroke
patterns, randomly shifted, dimmed and noised; no download). The network
uses Keras's defaults where the lesson does not say: Glorot-uniform weights,
zero biases, leaky ReLU with slope 0.3, mean softmax cross-entropy, batches
of 32.
"""
import contextlib
import math
import os
import sys

import numpy as np

import clipcore
from clipcore.workloads import WORKLOADS

CLIP_NORM = 15.0
LR = 1.0
SLOPE = 0.3          # leaky ReLU's slope for x < 0 (Keras's LeakyReLU default)
BATCH = 32
SHOW_STEPS = 3       # clipped steps whose per-tensor norms are printed


def make_digits(n, seed=0):
    """Synthetic 28x28 "digits": n images in [0, 1] (float32, flattened) and their labels.

    Each of the 10 classes is a pattern of four thick strokes; an image is its
    class's pattern shifted by up to 2 pixels, dimmed by up to 30% and noised.

    Examples
    --------
    >>> from clipcore.demo import make_digits
    >>> x, y = make_digits(5)
    >>> x.shape, x.dtype, y.shape, bool(x.min() >= 0 and x.max() <= 1)
    ((5, 784), dtype('float32'), (5,), True)
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    patterns = np.zeros((10, 28, 28))
    for k in range(10):
        for x0, y0, x1, y1 in rng.uniform(6, 22, (4, 4)):
            for t in np.linspace(0, 1, 30):
                cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                np.maximum(patterns[k], np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2),
                           out=patterns[k])
    labels = rng.integers(0, 10, n)
    shifts = rng.integers(-2, 3, (n, 2))
    images = np.empty((n, 28, 28), np.float32)
    for i in range(n):
        images[i] = np.roll(patterns[labels[i]], tuple(shifts[i]), axis=(0, 1))
    images *= rng.uniform(0.7, 1.0, (n, 1, 1)).astype(np.float32)
    images += rng.normal(0, 0.1, images.shape).astype(np.float32)
    np.clip(images, 0, 1, out=images)
    return images.reshape(n, 784), labels


def init_params(seed=0):
    """Glorot-uniform weights and zero biases for the MLP, in :data:`WORKLOADS` ["mlp"] order."""
    rng = np.random.default_rng(seed)
    params = []
    for _, shape in WORKLOADS["mlp"]:
        if len(shape) == 2:
            limit = math.sqrt(6 / (shape[0] + shape[1]))
            params.append(rng.uniform(-limit, limit, shape).astype(np.float32))
        else:
            params.append(np.zeros(shape, np.float32))
    return params


def loss_and_grads(params, x, y):
    """Mean cross-entropy, accuracy and the gradients (float32, params' order) of one batch."""
    w1, b1, w2, b2, w3, b3 = params
    n = len(y)
    pre1 = x @ w1 + b1
    h1 = np.where(pre1 > 0, pre1, SLOPE * pre1)
    pre2 = h1 @ w2 + b2
    h2 = np.where(pre2 > 0, pre2, SLOPE * pre2)
    logits = h2 @ w3 + b3
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    loss = float(np.mean(log_sum - shifted[np.arange(n), y]))
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    d_logits = np.exp(shifted - log_sum[:, None])
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    d_h2 = (d_logits @ w3.T) * np.where(pre2 > 0, 1, SLOPE).astype(np.float32)
    d_h1 = (d_h2 @ w2.T) * np.where(pre1 > 0, 1, SLOPE).astype(np.float32)
    grads = [x.T @ d_h1, d_h1.sum(0), h1.T @ d_h2, d_h2.sum(0), h2.T @ d_logits, d_logits.sum(0)]
    return loss, accuracy, [g.astype(np.float32, copy=False) for g in grads]


def _have_threadpoolctl():
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _one_blas_thread():
    # A 32x784 @ 784x256 product is far too small to share out: BLAS threads
    # only wait for each other (on a busy 2-core machine, a scheduler tick
    # each). threadpoolctl (in clipcore[bench]) pins BLAS to one thread;
    # without it BLAS runs as configured (OPENBLAS_NUM_THREADS=1 does the same).
    if not _have_threadpoolctl():
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield


def train(clip, *, epochs=8, n=2000, seed=0, log=None):
    """Train the MLP; returns a dict of per-step and per-epoch losses and accuracies.

    Parameters
    ----------
    clip : bool
        Clip the gradients with ``clipcore.clip_by_global_norm_(grads, 15)``
        before each update.
    epochs, n, seed : int
        Epochs, training images, seed of the data and the initial weights.
    log : callable, optional
        Called with lines of text to print: the gradient norms of the first
        steps, per-tensor norms before and after the first clipped steps,
        one line per epoch.

    Returns
    -------
    dict
        ``step_loss``, ``epoch_loss``, ``epoch_accuracy``, ``max_grad_norm``
        (per epoch, before clipping), ``first_nonfinite_step`` (None if the
        loss stayed finite), ``clipped_steps`` (steps whose gradients were
        scaled down).

    Examples
    --------
    >>> from clipcore.demo import train
    >>> r = train(clip=True, epochs=1, n=64)
    >>> len(r["step_loss"]), r["first_nonfinite_step"]
    (2, None)
    """
    log = log or (lambda line: None)
    x, y = make_digits(n, seed)
    params = init_params(seed + 1)
    names = [name for name, _ in WORKLOADS["mlp"]]
    result = {"step_loss": [], "epoch_loss": [], "epoch_accuracy": [], "max_grad_norm": [],
              "first_nonfinite_step": None, "clipped_steps": 0}
    step, tables, norms = 0, [], []
    with np.errstate(all="ignore"), _one_blas_thread():
        for epoch in range(1, epochs + 1):
            losses, accuracies, max_norm = [], [], 0.0
            for lo in range(0, n, BATCH):
                step += 1
                loss, accuracy, grads = loss_and_grads(params, x[lo:lo + BATCH], y[lo:lo + BATCH])
                before = [clipcore.global_norm([g]) for g in grads]
                if clip:
                    norm = clipcore.clip_by_global_norm_(grads, CLIP_NORM)
                else:
                    norm = clipcore.global_norm(grads)
                if result["first_nonfinite_step"] is None:
                    norms.append(norm)
                if clip and norm > CLIP_NORM:
                    result["clipped_steps"] += 1
                    if len(tables) < SHOW_STEPS:
                        tables.append(_clipped_table(step, names, grads, before, norm))
                max_norm = norm if not math.isfinite(norm) else max(max_norm, norm)
                for p, g in zip(params, grads):
                    p -= LR * g
                if not math.isfinite(loss) and result["first_nonfinite_step"] is None:
                    result["first_nonfinite_step"] = step
                result["step_loss"].append(loss)
                losses.append(loss)
                accuracies.append(accuracy)
            if epoch == 1:
                _log_first_norms(log, norms, result["first_nonfinite_step"])
                for line in (line for table in tables for line in table):
                    log(line)
            result["epoch_loss"].append(float(np.mean(losses)))
            result["epoch_accuracy"].append(float(np.mean(accuracies)))
            result["max_grad_norm"].append(float(max_norm))
            log(f"  epoch {epoch:2d}  loss {result['epoch_loss'][-1]:10.4g}  "
                f"accuracy {result['epoch_accuracy'][-1]:.2f}  "
                f"largest gradient norm {max_norm:.3g}")
    return result


def _log_first_norms(log, norms, nonfinite_step):
    """The global gradient norm (before clipping) of the first steps, up to a blow-up."""
    shown = norms[:nonfinite_step] if nonfinite_step else norms[:20]
    log(f"  global gradient norm (before any clipping), steps 1-{len(shown)}:\n    "
        + " ".join(f"{v:.3g}" for v in shown))


def _clipped_table(step, names, grads, before, norm):
    """Lines showing each tensor's norm before and after a clipped step."""
    after = [clipcore.global_norm([g]) for g in grads]
    lines = [f"  step {step}: global norm {norm:.4g} > {CLIP_NORM:g}, every tensor scaled "
             f"by {CLIP_NORM / norm:.4g}",
             f"    {'tensor':<12}{'shape':>10}{'norm before':>14}{'norm after':>14}"]
    for name, g, b, a in zip(names, grads, before, after):
        lines.append(f"    {name:<12}{'x'.join(map(str, g.shape)):>10}{b:>14.4g}{a:>14.4g}")
    return lines


def check_plot_path(path):
    """Raise ImportError without matplotlib, OSError if path's folder is not writable."""
    from matplotlib.figure import Figure  # noqa: F401  (ImportError: say so before training)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OSError(f"folder {folder!r} does not exist or is not writable")


def plot_losses(without, with_clip, path):
    """Write the two runs' training losses per step to path (PNG); the blow-up is marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for r, label, color in ((without, "without clipping", "#d62728"),
                            (with_clip, f"clip_by_global_norm_(grads, {CLIP_NORM:g})", "#1f77b4")):
        loss = np.array(r["step_loss"])
        steps = np.arange(1, len(loss) + 1)
        ok = np.isfinite(loss)
        ax.plot(steps[ok], loss[ok], color=color, linewidth=0.6, alpha=0.35)
        # The mean of the last 20 steps: the trend through the batch-to-batch noise.
        kernel = np.ones(20) / 20
        if ok.sum() >= 20:
            smooth = np.convolve(loss[ok], kernel, mode="valid")
            ax.plot(steps[ok][19:], smooth, color=color, linewidth=2, label=label)
        else:
            ax.plot(steps[ok], loss[ok], color=color, linewidth=2, label=label)
        s = r["first_nonfinite_step"]
        if s is not None:
            ax.axvline(s, color=color, linestyle="--", linewidth=1)
            ax.annotate(f" loss {loss[s - 1]} from step {s}", (s, 0.97), color=color,
                        xycoords=("data", "axes fraction"), va="top", fontsize=8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("step (batch of 32); thick: mean of the last 20 steps")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("MLP 784-256-128-10, plain SGD lr=1, synthetic digits")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(epochs=8, plot=None, out=None):
    """Run both trainings, print what happens, plot to ``plot`` if given; returns 0."""
    out = out or sys.stdout

    def log(line):
        print(line, file=out)

    log("clipcore demo: MLP 784-256-128-10 (leaky ReLU), softmax cross-entropy, plain SGD "
        f"lr={LR:g}, batch {BATCH},\n2000 synthetic 28x28 digits generated by clipcore "
        "(no download), the same initial weights for both runs.\n")
    if not _have_threadpoolctl():
        log("(threadpoolctl is not installed, so BLAS may split these small products over "
            "threads,\nwhich is slow on a busy machine: pip install threadpoolctl, or set "
            "OPENBLAS_NUM_THREADS=1.)\n")
    log("Run 1: without clipping")
    without = train(False, epochs=epochs, log=log)
    log(f"\nRun 2: with clipcore.clip_by_global_norm_(grads, {CLIP_NORM:g}) before each update")
    with_clip = train(True, epochs=epochs, log=log)
    log("")
    s = without["first_nonfinite_step"]
    if s is not None:
        log(f"Without clipping the loss became {without['step_loss'][s - 1]} at step {s} "
            f"and never recovered.")
    else:
        log(f"Without clipping the final loss is {without['epoch_loss'][-1]:.4g}.")
    if with_clip["first_nonfinite_step"] is None:
        log(f"With clipping it stayed finite: final loss {with_clip['epoch_loss'][-1]:.4g}, "
            f"accuracy {with_clip['epoch_accuracy'][-1]:.2f}.")
    else:
        log(f"With clipping the loss also became non-finite, at step "
            f"{with_clip['first_nonfinite_step']}.")
    if plot:
        plot_losses(without, with_clip, plot)
        log(f"Loss curves: {plot}")
    return 0
