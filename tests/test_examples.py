"""Run every example in examples/ as a user would, and check what its output claims."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clipcore

pytestmark = pytest.mark.requires_source_tree

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(clipcore.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return [float(g) for g in m.groups()] if len(m.groups()) > 1 else float(m.group(1))


def check_training_claims(out, clip):
    first, final = number(r"first batch loss ([\d.]+), final training loss ([\d.]+)", out)
    assert final < first / 10
    assert number(r"final test accuracy ([\d.]+)", out) >= 0.85
    n_clipped, n_steps = number(r"clipped (\d+) of (\d+) steps", out)
    assert 0 < n_clipped < n_steps           # clipping happened, and not on every step
    median, largest = number(r"global norm before clipping: median ([\d.]+), max ([\d.]+)", out)
    assert largest > clip


def test_numpy_mlp_plan():
    out = run_example("numpy_mlp_plan.py", "--epochs", "3")
    assert number(r"Plan over (\d+) gradient buffers", out) == 6
    assert number(r"buffers, (\d+) values", out) == 235_146
    check_training_claims(out, 1.0)
    assert number(r"largest global norm after clipping: ([\d.]+)", out) <= 1.0 + 1e-6


@pytest.mark.requires_torch
def test_torch_loop():
    out = run_example("torch_loop.py", "--epochs", "3")
    ours, theirs = number(r"clipcore norm ([\d.]+), torch norm ([\d.]+)", out)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert "dtype torch.float32" in out
    assert number(r"norm after clipping ([\d.]+)", out) == pytest.approx(1.0, rel=1e-5)
    check_training_claims(out, 1.0)


@pytest.mark.requires_tf
def test_tf_custom_loop():
    out = run_example("tf_custom_loop.py", "--epochs", "3")
    ours, theirs = number(r"clipcore norm ([\d.]+), tf norm ([\d.]+)", out)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert "output types ['EagerTensor']" in out
    assert number(r"max \|clipcore - tf\| ([\d.eE+-]+)", out) <= 1e-6
    check_training_claims(out, 1.0)
