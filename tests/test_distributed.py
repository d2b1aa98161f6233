"""clipcore.distributed: real MPI (mpiexec) and torch.distributed (gloo) jobs of 2 and 4 ranks.

The checks themselves live in _distributed_worker.py, which every rank runs;
here each job is one subprocess with a timeout, so a deadlock fails the test
instead of hanging the suite. MPI is never initialized in the pytest process.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import clipcore
from clipcore import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_distributed_worker.py")
TIMEOUT = 180


def mpiexec():
    """The mpiexec of the MPI that mpi4py loads: the mpich wheel's, beside this Python."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    assert found, "mpiexec not found: install the test extra (mpi4py, mpich)"
    return found


def run(args):
    # The ranks import the same clipcore as this process (an in-place build or
    # an installed one), on one OpenMP thread each: the machine may have 2 cores.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [
                   os.path.dirname(os.path.dirname(clipcore.__file__)),
                   os.environ.get("PYTHONPATH")])))
    try:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} hung for {TIMEOUT} s (a deadlock?)\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def ranks_ok(out):
    # Lines from different ranks may arrive interleaved: match, don't split.
    return sorted(re.findall(r"rank (\d+/\d+): ok", out))


@pytest.mark.requires_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi(n):
    out = run([mpiexec(), "-n", str(n), sys.executable, WORKER, "mpi"])
    assert ranks_ok(out) == [f"{r}/{n}" for r in range(n)]


@pytest.mark.requires_torch
@pytest.mark.parametrize("n", [2, 4])
def test_torch_gloo(n):
    out = run([sys.executable, WORKER, "torch", str(n)])
    assert ranks_ok(out) == [f"{r}/{n}" for r in range(n)]


@pytest.mark.requires_mpi
@pytest.mark.requires_source_tree
def test_example_distributed_mpi():
    out = run([mpiexec(), "-n", "2", sys.executable,
               os.path.join(ROOT, "examples", "distributed_mpi.py")])
    found = sorted(re.findall(r"rank (\d)/2: shard norm ([\d.]+), global norm ([\d.]+), "
                              r"after clipping to 1.0: ([\d.]+)", out))
    assert [f[0] for f in found] == ["0", "1"], out
    assert found[0][1] != found[1][1]                  # each rank has its own shard,
    assert found[0][2] == found[1][2]                  # the same global norm,
    assert float(found[0][2]) > 1.0
    assert [f[3] for f in found] == ["1.000000"] * 2   # and 1.0 after clipping


def test_import_needs_neither_mpi4py_nor_torch():
    code = ("import sys, clipcore, clipcore.distributed; "
            "print(sorted(m for m in ('mpi4py', 'torch') if m in sys.modules))")
    assert run([sys.executable, "-c", code]).strip() == "[]"


@pytest.mark.parametrize("group", [object(), "world", 0, 1.5, np.zeros(2), [None]],
                         ids=lambda g: type(g).__name__)
def test_wrong_group_type(group):
    arrays = [np.array([3.0, 4.0])]
    with pytest.raises(TypeError, match=r"group must be an mpi4py communicator, a "
                                        r"torch.distributed ProcessGroup or None, got "):
        distributed.global_norm(arrays, group)
    with pytest.raises(TypeError, match="group must be"):
        distributed.clip_by_global_norm_(arrays, 1.0, group)
    assert arrays[0].tolist() == [3.0, 4.0]


@pytest.mark.requires_torch
def test_wrong_torch_object_as_group():
    import torch
    with pytest.raises(TypeError, match="got torch.Tensor"):
        distributed.global_norm([np.ones(2)], torch.zeros(2))


def test_group_none_needs_torch_default_group():
    # Nothing in this process initializes torch.distributed.
    with pytest.raises(ValueError, match="default process group.*not initialized"):
        distributed.global_norm([np.ones(2)], None)
    with pytest.raises(ValueError, match="not initialized"):
        distributed.clip_by_global_norm_([np.ones(2)], 1.0, None)


@pytest.mark.requires_mpi
@pytest.mark.requires_source_tree
def test_benchmark_script_runs():
    # Figures are the benchmark's business; this only keeps the script working.
    out = run([mpiexec(), "-n", "2", sys.executable,
               os.path.join(ROOT, "benchmarks", "bench_distributed.py"),
               "--quick", "--workload", "mnist_mlp"])
    assert re.search(r"mnist_mlp .* distributed +[\d.]+ us +local\+scalar +[\d.]+ us", out), out
