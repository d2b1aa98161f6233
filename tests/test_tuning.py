"""The kernels' run-time variants (clipcore._tuning): every variant gives the
same bits, the environment forces them, the cache is checked, calibration
failures fall back to the table, and late teams make the default go serial."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import clipcore
from clipcore import _tuning, kernels

VARIANTS = [dict(prefetch=p, scale_backward=b, twins=t, prefetch16=h)
            for p in (False, True) for b in (False, True) for t in (False, True)
            for h in (False, True)]


@pytest.fixture
def restore_tuning():
    saved = kernels.get_tuning()
    yield
    kernels.set_tuning(**saved)


def outputs(n_threads):
    """Every kernel-backed result on one fixed input, as bytes."""
    rng = np.random.default_rng(7)
    base = [rng.standard_normal(s).astype(np.float32) * 10
            for s in [(300, 257), (1 << 17,), (5, 7), (1,)]]
    base.append(rng.standard_normal((200, 300)))            # float64
    out = []
    grads = [a.copy() for a in base]
    out.append(clipcore.clip_by_global_norm_(grads, 1.0, n_threads=n_threads))
    grads2 = [a.copy() for a in base]
    plan = clipcore.Plan(grads2, n_threads=n_threads)
    out += [plan.global_norm(), plan.global_norm(norm_type=3), plan.clip_by_global_norm_(2.0)]
    clipped, norm = clipcore.clip_by_global_norm(base, 1.0, n_threads=n_threads)
    x = base[0].copy()
    clipcore.relu_(x, n_threads=n_threads)
    y = base[1].copy()
    clipcore.clip_by_value_(y, -1.0, 1.0, n_threads=n_threads)
    z = clipcore.clip_by_norm(base[0], 1.0, axes=[1], n_threads=n_threads)
    small = many_small(rng)
    out += [clipcore.global_norm(small, norm_type=p, n_threads=n_threads)
            for p in (2.0, 1.0, np.inf, 3.0)]
    out.append(clipcore.clip_by_global_norm_(small, 1.0, n_threads=n_threads))
    arrays = grads + grads2 + clipped + [x, y, z, np.asarray(norm)] + small
    return out, b"".join(a.tobytes() for a in arrays)


def many_small(rng):
    """Many small buffers in few chunks: runs of contiguous ones longer than a
    reduction takes at once, of every element type in turn, strided ones between."""
    dtypes = [np.float32, np.float16, np.float64]
    try:
        import ml_dtypes
        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    small = [rng.standard_normal(int(n)).astype(np.float32)
             for n in rng.integers(1, 300, size=100)]
    for k in range(200):
        a = rng.standard_normal(int(rng.integers(1, 200))) * 10.0 ** rng.integers(-3, 4)
        a = a.astype(dtypes[k % len(dtypes)])
        small.append(a[::2] if k % 7 == 0 else a)
    return small


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(
    f"{k}{int(x)}" for k, x in v.items()))
def test_every_variant_gives_the_same_bits_at_every_thread_count(variant, restore_tuning):
    kernels.set_tuning(prefetch=True, scale_backward=True, twins=True, prefetch16=True)
    reference = outputs(1)
    kernels.set_tuning(**variant)
    for n_threads in (1, 2, 7):
        assert outputs(n_threads) == reference


def test_results_match_a_float64_reference_in_a_variant(restore_tuning):
    kernels.set_tuning(prefetch=False, scale_backward=False, twins=False, prefetch16=False)
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    ref = np.sqrt(np.sum(x.astype(np.float64) ** 2))
    assert clipcore.global_norm([x], n_threads=2) == pytest.approx(ref, rel=1e-12)


def run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120, check=True)


def test_environment_forces_every_choice(tmp_path):
    out = run("import clipcore, json; print(json.dumps(clipcore.kernels.get_tuning()));"
              "clipcore.show_config()", XDG_CACHE_HOME=str(tmp_path),
              CLIPCORE_KERNELS="prefetch=1,scale_backward=0,twins=0,prefetch16=0,"
                               "parallel_min=12345")
    assert json.loads(out.stdout.splitlines()[0]) == {
        "prefetch": True, "scale_backward": False, "twins": False, "prefetch16": False,
        "parallel_min": 12345}
    assert "from CLIPCORE_KERNELS=" in out.stdout
    assert not (tmp_path / "clipcore").exists()         # nothing calibrated, nothing cached


@pytest.mark.parametrize("text", ["bogus", "prefetch=2", "parallel_min=-1", "twins=yes"])
def test_bad_environment_falls_back_to_the_table(tmp_path, text):
    out = run("import clipcore; clipcore.show_config()", XDG_CACHE_HOME=str(tmp_path),
              CLIPCORE_KERNELS=text)
    assert "CLIPCORE_KERNELS" in out.stderr and "from table" in out.stdout


def test_calibration_is_cached_and_reused(tmp_path):
    code = "import clipcore; print(clipcore._tuning.source)"
    first = run(code, XDG_CACHE_HOME=str(tmp_path), CLIPCORE_KERNELS="")
    assert first.stdout.startswith("calibrated now")
    data = json.loads((tmp_path / "clipcore" / "tuning.json").read_text())
    assert data["version"] == _tuning.CACHE_VERSION
    (entry,) = data["machines"].values()
    assert _tuning.valid(entry)
    second = run(code, XDG_CACHE_HOME=str(tmp_path), CLIPCORE_KERNELS="")
    assert second.stdout.startswith("cached calibration")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 999, "machines": {}}),
                                     json.dumps({"version": _tuning.CACHE_VERSION,
                                                 "machines": []}),
                                     "KEY"])
def test_corrupt_or_foreign_cache_is_ignored(tmp_path, content):
    path = tmp_path / "clipcore" / "tuning.json"
    path.parent.mkdir()
    key = run("import clipcore; print(clipcore._tuning.cache_key())",
              XDG_CACHE_HOME=str(tmp_path), CLIPCORE_KERNELS="table").stdout.strip()
    if content == "KEY":      # this machine's entry, but not a valid choice
        content = json.dumps({"version": _tuning.CACHE_VERSION,
                              "machines": {key: {"prefetch": "yes"}}})
    path.write_text(content)
    out = run("import clipcore; print(clipcore._tuning.source)", XDG_CACHE_HOME=str(tmp_path),
              CLIPCORE_KERNELS="")
    assert out.stdout.startswith("calibrated now")
    assert _tuning.valid(json.loads(path.read_text())["machines"][key])


def test_a_cached_choice_is_applied(tmp_path):
    path = tmp_path / "clipcore" / "tuning.json"
    path.parent.mkdir()
    key = run("import clipcore; print(clipcore._tuning.cache_key())",
              XDG_CACHE_HOME=str(tmp_path), CLIPCORE_KERNELS="table").stdout.strip()
    choice = {"prefetch": True, "scale_backward": False, "twins": False, "prefetch16": True,
              "parallel_min": 999}
    path.write_text(json.dumps({"version": _tuning.CACHE_VERSION, "machines": {key: choice}}))
    out = run("import clipcore, json; print(json.dumps(clipcore.kernels.get_tuning()))",
              XDG_CACHE_HOME=str(tmp_path), CLIPCORE_KERNELS="")
    assert json.loads(out.stdout) == choice


def test_failed_calibration_falls_back_to_the_table(tmp_path, monkeypatch, restore_tuning):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CLIPCORE_KERNELS", raising=False)

    def broken(budget=0.6):
        raise RuntimeError("no timer")
    monkeypatch.setattr(_tuning, "calibrate", broken)
    _tuning.apply()
    vendor, _ = _tuning.cpu_identity()
    assert _tuning.chosen == _tuning.TABLE.get(vendor, _tuning.DEFAULT)
    assert "calibration failed: no timer" in _tuning.source
    assert not (tmp_path / "clipcore").exists()


def test_interrupted_calibration_leaves_the_table_and_caches_nothing(tmp_path, monkeypatch,
                                                                      restore_tuning):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CLIPCORE_KERNELS", raising=False)

    def interrupted(budget=0.6):
        raise KeyboardInterrupt
    monkeypatch.setattr(_tuning, "calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _tuning.apply()
    vendor, _ = _tuning.cpu_identity()
    assert kernels.get_tuning() == _tuning.TABLE.get(vendor, _tuning.DEFAULT)
    assert not (tmp_path / "clipcore").exists()


@pytest.mark.parametrize("knob", ["prefetch", "scale_backward", "prefetch16"])
@pytest.mark.parametrize("faster", [False, True])
def test_calibration_keeps_a_variant_that_wins_every_round(monkeypatch, restore_tuning,
                                                           knob, faster):
    # A timer under which only `knob` matters, and its `faster` value wins by
    # 10%: calibration must find it whatever the table says; every other knob
    # ties and keeps the table's value.
    def timed(fn, reps):
        return 0.9 if kernels.get_tuning()[knob] == faster else 1.0
    monkeypatch.setattr(_tuning, "_median_time", timed)
    monkeypatch.setattr(kernels, "max_threads", lambda: 1)       # no crossover search
    vendor, _ = _tuning.cpu_identity()
    table = _tuning.TABLE.get(vendor, _tuning.DEFAULT)
    choice = _tuning.calibrate(budget=60)
    assert choice == {**table, knob: faster}


def test_calibration_stays_within_its_budget(restore_tuning):
    choice = _tuning.calibrate(budget=0.05)
    assert _tuning.valid(choice)


@pytest.mark.skipif(not kernels.openmp_enabled() or kernels.max_threads() < 2,
                    reason="needs OpenMP and 2 threads")
def test_a_late_team_makes_the_default_serial_for_a_while(restore_tuning, no_late_backoff):
    n = 1 << 24
    kernels._note_wait(10e-6, 1e-3)                  # a team that hardly waited
    assert kernels.late_team_backoff() == 0.0 and kernels.threads_for(n) == 2
    kernels._note_wait(40e-6, 60e-6)                 # most of the call, but too short to count
    assert kernels.late_team_backoff() == 0.0
    kernels._note_wait(3e-3, 5e-3)                   # waited for a busy core
    first = kernels.late_team_backoff()
    assert first > 0 and kernels.threads_for(n) == 1
    assert kernels.threads_for(n, 2) == 2            # an explicit n_threads is honoured
    assert kernels.threads_for(n, -2) == 1           # a framework's count (clipcore.torch) backs off
    kernels._note_wait(3e-3, 5e-3)
    second = kernels.late_team_backoff()
    assert second > first                            # still late: backs off longer
    kernels._note_wait(10e-6, 1e-3)
    assert kernels.late_team_backoff() == 0.0 and kernels.threads_for(n) == 2
    assert kernels.threads_for(n, -2) == 2
    # A busy core lets some teams through on time: one on time between late
    # ones does not start the back-off over.
    kernels._note_wait(3e-3, 5e-3)
    assert kernels.late_team_backoff() > second


@pytest.mark.skipif(not kernels.openmp_enabled() or kernels.max_threads() < 2,
                    reason="needs OpenMP and 2 threads")
def test_a_late_team_long_after_the_last_backs_off_the_least(no_late_backoff):
    kernels._note_wait(3e-3, 5e-3)
    least = kernels.late_team_backoff()
    kernels._note_wait(3e-3, 5e-3)
    assert kernels.late_team_backoff() > least
    kernels._note_wait(10e-6, 1e-3)
    time.sleep(5 * 2 * least)                        # past the memory of the last one
    kernels._note_wait(3e-3, 5e-3)
    assert kernels.late_team_backoff() == least


def _long_backoff():
    """The back-off after five late teams in a row: long enough that it does
    not run out during the call that follows."""
    for _ in range(5):
        kernels._note_wait(3e-3, 5e-3)
    return kernels.late_team_backoff()


_rng = np.random.default_rng(3)
TEAM_CALLS = {   # each runs at least one team of 2 threads (explicit n_threads: no back-off)
    "clip_by_norm rows": lambda x=_rng.standard_normal((256, 1024)).astype(np.float32):
        clipcore.clip_by_norm(x, 1.0, axes=[1], n_threads=2),
    "clip_by_norm long rows": lambda x=_rng.standard_normal((2, 200_000)).astype(np.float32):
        clipcore.clip_by_norm(x, 1.0, axes=[1], n_threads=2),
    "clip_by_norm columns": lambda x=_rng.standard_normal((1024, 256)).astype(np.float32):
        clipcore.clip_by_norm(x, 1.0, axes=[0], n_threads=2),
    "norm over columns": lambda x=_rng.standard_normal((2048, 1024)).astype(np.float32):
        clipcore.norm(x, axis=0, n_threads=2),
    "clip_by_global_norm out of place, use_norm given":
        lambda t=[_rng.standard_normal(300_000).astype(np.float32), _rng.standard_normal(5000)]:
        clipcore.clip_by_global_norm(t, 1.0, use_norm=10.0, n_threads=2),
    "relu_": lambda x=_rng.standard_normal(1 << 18).astype(np.float32):
        clipcore.relu_(x, n_threads=2),
    "adaptive_grad_clip_": lambda g=_rng.standard_normal((512, 1024)).astype(np.float32),
        p=_rng.standard_normal((512, 1024)).astype(np.float32):
        clipcore.adaptive_grad_clip_([g], [p], 1e-3, n_threads=2),
}


@pytest.mark.parametrize("call", TEAM_CALLS.values(), ids=TEAM_CALLS.keys())
def test_every_engine_tells_the_back_off_how_its_team_did(call, no_late_backoff):
    # After a team, the back-off is either over (the team was on time) or
    # longer (it was late): never what it was, as it would be if the engine's
    # region bypassed kernels.run_items.
    before = _long_backoff()
    assert before > 0
    call()
    assert kernels.late_team_backoff() != before
