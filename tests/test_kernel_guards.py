"""The kernels' guards: small stack frames, fork, bounded teams, range-safe norms.

The first three run their reproducer in a subprocess, so that a segfault, an
abort or a hang fails the test instead of taking pytest down with it.
"""
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

import clipcore
from clipcore import kernels

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")


def run_script(code, timeout=120):
    """Run code in a fresh interpreter; fail on a non-zero exit (a signal included)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=dict(os.environ))
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


# --- per-call state off the stack ------------------------------------------------------

def test_every_kernel_runs_in_a_thread_with_a_small_stack():
    out = run_script("""
        import threading
        import numpy as np
        import clipcore

        N = 2_000_000
        done = []

        def work():
            x = np.ones(N, np.float32)
            clipcore.clip_by_global_norm_([x], 1.0, n_threads=2)
            plan = clipcore.Plan([x], n_threads=2)
            plan.global_norm()
            plan.clip_by_global_norm_(0.5)
            clipcore.global_norm([x], n_threads=2)
            clipcore.clip_by_global_norm([x, x.astype(np.float64)], 1.0, n_threads=2)
            clipcore.clip_by_value(x, -0.1, 0.1, n_threads=2)
            clipcore.relu_(x, n_threads=2)
            m = np.ones((2000, 1000), np.float32)
            clipcore.clip_by_norm(m, 1.0, axes=[0], n_threads=2)
            clipcore.clip_by_norm(m, 1.0, axes=[1], n_threads=2)
            clipcore.clip_by_norm(m, 1.0, axes=[0], n_threads=1)
            clipcore.norm(m, axis=0, n_threads=2)
            clipcore.clip_by_norm(m.astype(np.float64), 1.0, axes=[0], n_threads=1)
            done.append(True)

        threading.stack_size(64 * 1024)
        try:
            t = threading.Thread(target=work)
            t.start()
            t.join()
        finally:
            threading.stack_size(0)
        print("ok" if done else "failed")
    """)
    assert out.split() == ["ok"]


# --- fork ------------------------------------------------------------------------------

@needs_fork
@pytest.mark.parametrize("how", ["ctypes", "os"])
def test_forked_child_does_not_hang(how):
    # The parent's parallel call starts OpenMP's pool, which a child cannot use.
    run_script(f"""
        import ctypes, os, signal, time
        import numpy as np
        import clipcore
        from clipcore import kernels
        from clipcore.bench._probe import bandwidth_probe

        x = np.ones(2_000_000, np.float32)
        expected = clipcore.global_norm([x], n_threads=2)
        fork = ctypes.CDLL(None).fork if {how!r} == "ctypes" else os.fork
        pid = fork()
        if pid == 0:
            y = x.copy()
            ok = clipcore.clip_by_global_norm_([y], 1.0, n_threads=2) == expected
            ok = ok and np.allclose(y, 1.0 / expected)
            bandwidth_probe(x, 2)
            bandwidth_probe(x, 0, read=False)
            os._exit(0 if ok and kernels.max_threads() == 1 else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SystemExit("the forked child hung")
            time.sleep(0.05)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """)


# --- bounded teams ---------------------------------------------------------------------

def test_thread_count_is_capped(no_late_backoff):
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cap = 4 * (procs if kernels.openmp_enabled() else 1)     # THREADS_PER_PROC per processor
    assert kernels.threads_for(10**8, 1 << 16) == cap
    assert kernels.threads_for(10**8, 0) == min(kernels.max_threads(), cap)
    assert kernels.threads_for(10**8, 7) == min(7, cap)     # takeover tests stay possible
    assert kernels.threads_for(100_000, 4096) == min(7, cap)   # 100000 elements: 7 chunks


def test_huge_n_threads_under_an_address_space_limit():
    if not hasattr(os, "fork") or sys.platform != "linux":
        pytest.skip("RLIMIT_AS is Linux's")
    out = run_script("""
        import resource
        import numpy as np
        import clipcore
        x = np.ones(4096 * 16384, np.float32)
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY))
        print(clipcore.clip_by_global_norm_([x], 1.0, n_threads=4096))
    """)
    assert float(out) == 8192.0


def test_bandwidth_probe_with_huge_n_threads():
    run_script("""
        import numpy as np
        from clipcore.bench._probe import bandwidth_probe
        bandwidth_probe(np.ones(16, np.float32), 100000)
        bandwidth_probe(np.ones(16, np.float32), 100000, read=False)
    """)


# --- range-safe norms ------------------------------------------------------------------

def exact_norm(values, p):
    """The p-norm (integer p) of float64 values, from exact rational sums."""
    s = sum(abs(Fraction(float(v))) ** p for v in values)
    if s == 0:
        return 0.0
    # An integer root of a huge/tiny rational: scale into float range first.
    m = max(abs(Fraction(float(v))) for v in values)
    return float(m) * float(s / m ** p) ** (1.0 / p)


def scaled_ref(arrays):
    """The 2-norm as m * sqrt(sum((x / m)^2)) in float64 (no overflow, no underflow)."""
    x = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    m = np.max(np.abs(x))
    return 0.0 if m == 0 else float(m * math.sqrt(math.fsum(((x / m) ** 2).tolist())))


@pytest.mark.parametrize("p", [3, 4, 1.5])
def test_p_norm_of_subnormal_float64(p):
    x = np.array([1e-310, 0.0])
    got = clipcore.clip_by_global_norm_([x], 1.0, norm_type=p)
    assert got == pytest.approx(1e-310, rel=1e-12, abs=0)
    assert list(x) == [1e-310, 0.0]
    y = np.array([3e-310, -4e-310, 5e-311])
    assert clipcore.global_norm([y], norm_type=3) == pytest.approx(exact_norm(y, 3), rel=1e-12, abs=0)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("values", [[1e154, 1e154], [1e-154, 1e-154], [1e-170] * 3,
                                    [1e300, -1e300, 3e299], [1e-200, 0.0, -2e-200],
                                    [1.5e-320, 1e-310]])
def test_float64_two_norm_is_range_safe(values, n_threads):
    x = np.array(values)
    expected = scaled_ref([x])
    assert expected == pytest.approx(exact_norm(values, 2), rel=1e-14, abs=0)
    assert clipcore.global_norm([x], n_threads=n_threads) == pytest.approx(expected, rel=1e-14, abs=0)
    assert clipcore.Plan([x.copy()]).global_norm() == pytest.approx(expected, rel=1e-14, abs=0)
    clipped, norm = clipcore.clip_by_global_norm([x], 1.0, n_threads=n_threads)
    assert norm == pytest.approx(expected, rel=1e-14, abs=0)
    big = expected > 1.0
    np.testing.assert_allclose(clipped[0], x / expected if big else x, rtol=1e-14)
    y = x.copy()
    assert clipcore.clip_by_global_norm_([y], 1.0, n_threads=n_threads) == \
        pytest.approx(expected, rel=1e-14, abs=0)
    np.testing.assert_allclose(y, x / expected if big else x, rtol=1e-14)
    assert np.all(np.isfinite(y))


def test_float64_two_norm_range_safe_in_mixed_and_large_lists():
    a = np.array([1e154, 1e154])
    assert clipcore.global_norm([a]) == pytest.approx(math.sqrt(2) * 1e154, rel=1e-15, abs=0)
    y = a.copy()
    clipcore.clip_by_global_norm_([y], 1.0)
    np.testing.assert_allclose(y, [0.7071067811865476] * 2, rtol=1e-15)
    mixed = [np.ones(1000, np.float32), np.full(3, 1e160), np.full(5, 2.0, np.float32)]
    assert clipcore.global_norm(mixed) == pytest.approx(scaled_ref(mixed), rel=1e-14, abs=0)
    tiny = [np.ones(7, np.float32) * 1e-30, np.full(3, 1e-170)]
    assert clipcore.global_norm(tiny) == pytest.approx(scaled_ref(tiny), rel=1e-14, abs=0)
    # Large enough for a team; byte-swapped float64 goes through a float64 copy.
    big = [np.full(300_000, 1e154), np.full(300_000, -1e154).astype(">f8")]
    for nt in (1, 2, 7):
        assert clipcore.global_norm(big, n_threads=nt) == pytest.approx(scaled_ref(big),
                                                                         rel=1e-13, abs=0)


def test_two_norm_keeps_nan_inf_and_zero():
    assert clipcore.global_norm([np.array([1e300, np.inf])]) == math.inf
    assert math.isnan(clipcore.global_norm([np.array([1e300, np.nan, np.inf])]))
    assert clipcore.global_norm([np.zeros(5)]) == 0.0
    assert clipcore.global_norm([np.zeros(5, np.float32), np.zeros(3)]) == 0.0
    # float32 squares never leave float64's range: the fast path is exact enough.
    f = np.array([3e38, 3e38, 1e-45], np.float32)
    assert clipcore.global_norm([f]) == pytest.approx(scaled_ref([f]), rel=1e-15, abs=0)


# The per-axis engine (clipcore.norm, clip_by_norm) still sums plain float64
# squares per slice, then takes the root: not range-safe yet.
@pytest.mark.parametrize("values", [[1e154, 1e154], [1e-160, 1e-160], [1e300, 2e300]])
def test_per_axis_float64_two_norm_is_range_safe(values):
    x = np.array([values, [3.0, 4.0]])
    expected = np.array([scaled_ref([x[0]]), 5.0])
    np.testing.assert_allclose(clipcore.norm(x, axis=1), expected, rtol=1e-14)
    got = clipcore.clip_by_norm(x, 1.0, axes=[1])
    np.testing.assert_allclose(got, x * np.minimum(1.0, 1.0 / expected)[:, None], rtol=1e-14)
    np.testing.assert_allclose(clipcore.norm(x.T, axis=0), expected, rtol=1e-14)
    got = clipcore.clip_by_norm(x.T, 1.0, axes=[0])
    np.testing.assert_allclose(got, (x * np.minimum(1.0, 1.0 / expected)[:, None]).T,
                               rtol=1e-14)
