"""`python -m clipcore demo`: the lesson's claim, and the pieces it stands on."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import clipcore
from clipcore import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(clipcore.__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    # python -m puts the working directory first on sys.path: run where the
    # clipcore under test is, not in a source tree without its build.
    return subprocess.run([sys.executable, "-m", "clipcore", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_digits_are_deterministic_images_of_ten_classes():
    x, y = demo.make_digits(300, seed=1)
    x2, y2 = demo.make_digits(300, seed=1)
    x3, _ = demo.make_digits(300, seed=2)
    assert x.shape == (300, 784) and x.dtype == np.float32
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, x3)
    assert x.min() >= 0 and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))
    # The classes are learnable: the nearest class mean (of the first half)
    # labels most of the second half correctly.
    means = np.stack([x[:150][y[:150] == k].mean(axis=0) for k in range(10)])
    nearest = np.argmin(((x[150:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)
    assert np.mean(nearest == y[150:]) > 0.6


def test_backward_pass_matches_finite_differences():
    x, y = demo.make_digits(8, seed=3)
    params = [p.astype(np.float64) for p in demo.init_params(4)]
    params[1] += 0.05       # nonzero biases, so every gradient is exercised
    _, _, grads = demo.loss_and_grads(params, x.astype(np.float64), y)
    rng = np.random.default_rng(0)
    for k, p in enumerate(params):
        for _ in range(3):
            i = tuple(rng.integers(0, n) for n in p.shape)
            old = p[i]
            p[i] = old + 1e-6
            up = demo.loss_and_grads(params, x.astype(np.float64), y)[0]
            p[i] = old - 1e-6
            down = demo.loss_and_grads(params, x.astype(np.float64), y)[0]
            p[i] = old
            assert math.isclose(grads[k][i], (up - down) / 2e-6, rel_tol=1e-3, abs_tol=1e-6)


@pytest.fixture(scope="module")
def runs():
    return demo.train(False), demo.train(True)


def test_loss_blows_up_without_clipping(runs):
    without, with_clip = runs
    losses = np.array(without["step_loss"])
    blown_up = without["first_nonfinite_step"] is not None
    assert blown_up or np.nanmax(losses) > 100 * max(with_clip["step_loss"])
    if blown_up:
        s = without["first_nonfinite_step"]
        assert np.all(np.isfinite(losses[:s - 1])) and not np.isfinite(losses[s - 1])


def test_loss_stays_finite_and_training_works_with_clipping(runs):
    _, with_clip = runs
    assert with_clip["first_nonfinite_step"] is None
    assert np.all(np.isfinite(with_clip["step_loss"]))
    assert with_clip["clipped_steps"] > 0                # clipping did something
    acc = with_clip["epoch_accuracy"]
    assert acc[-1] > 0.5 and acc[-1] > acc[0] + 0.2       # and the network learned


def test_both_runs_start_from_the_same_point(runs):
    without, with_clip = runs
    # Until the first step that needs clipping, the two runs are the same run.
    assert without["step_loss"][0] == with_clip["step_loss"][0]


@pytest.mark.requires_matplotlib
def test_cli_demo_prints_the_story_and_plots(tmp_path):
    png = tmp_path / "loss.png"
    r = run_cli("demo", "--epochs", "2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Run 1: without clipping" in out and "Run 2: with clipcore.clip_by_global_norm_" in out
    assert "norm before" in out and "norm after" in out and "fc1.kernel" in out
    assert out.count("epoch  1") == 2 and out.count("epoch  2") == 2
    assert "With clipping it stayed finite" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.requires_matplotlib  # the demo looks for matplotlib before the path
def test_cli_demo_rejects_an_unwritable_plot_path(tmp_path):
    r = run_cli("demo", "--plot", str(tmp_path / "missing" / "loss.png"))
    assert r.returncode == 2
    assert "--plot" in r.stderr and "not writable" in r.stderr
