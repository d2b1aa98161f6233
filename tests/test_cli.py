"""`python -m clipcore bench`: argument handling, the harness, and a --quick run end to end."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import clipcore
from clipcore import bench
from clipcore.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(clipcore.__file__)))
IMPLS = ("clipcore", "clipcore Plan", "numpy", "torch", "tensorflow", "jax")
STATUSES = {"ok", "not installed", "not in this clipcore", "no equivalent", "error"}


def run_cli(*args, hide="torch,tensorflow,optax,matplotlib", cwd=ROOT):
    # python -m puts the working directory first on sys.path: run where the
    # clipcore under test is, not in a source tree without its build.
    env = dict(os.environ, CLIPCORE_BENCH_HIDE=hide, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "clipcore", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


# --- arguments -------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["bench", "--workload", "resnet"], "unknown workload 'resnet' (choose from 2000x512,"),
    (["bench", "--workload", "mlp,gpt3"], "unknown workload 'gpt3'"),
    (["bench", "--repeat", "0"], "--repeat: expected an integer >= 1, got 0"),
    (["bench", "--threads", "two"], "--threads: expected an integer >= 1, got 'two'"),
    (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--epochs", "-1"], "--epochs: expected an integer >= 1, got -1"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--out", str(tmp_path)] if argv[:1] == ["bench"] else []))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_an_error_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--workload", "mlp", "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--out '{out}': cannot write there" in err
    assert a_file.read_text() == ""


def test_workload_selection():
    assert [c.key for c in bench.select_cases(None)] == [c.key for c in bench.CASES]
    assert [c.key for c in bench.select_cases(["gpt2"])] == ["gpt2", "gpt2-noclip"]
    assert [c.key for c in bench.select_cases(["gpt2-noclip", "mlp"])] == ["mlp", "gpt2-noclip"]
    assert [c.key for c in bench.select_cases(["elementwise"])] == [
        "clip_by_value", "relu", "clip_by_norm"]


@pytest.mark.requires_source_tree
def test_default_out_dir_is_named_and_ignored_by_git():
    name = bench.default_out_dir()
    assert name.startswith("bench-results-")
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), ".gitignore")) as f:
        assert "bench-results*/" in f.read().split()


# --- the harness -----------------------------------------------------------

SMALL = (("a", (3000,)), ("b", (40, 50)), ("c", (7,)))


@pytest.fixture
def small():
    return bench.Data(SMALL, seed=2)


def test_measure_restores_before_every_call_outside_the_timing():
    log = []
    times, out = bench.measure(lambda: log.append("call") or "out",
                               lambda: log.append("restore"), repeat=4, warmup=2)
    assert log == ["restore", "call"] * 6
    assert len(times) == 4 and all(t >= 0 for t in times) and out == "out"


@pytest.mark.parametrize("family", ["clipcore", "numpy"])
@pytest.mark.parametrize("op", ["clip", "noclip"])
def test_every_repeat_clips_fresh_data(small, family, op):
    for impl, call in bench.calls(family, op, small, 1).items():
        times, out = bench.measure(call, small.restore, repeat=3)
        bench.verify(op, small, out)
        if op == "clip":    # clipped once, from the backup, not three times
            assert math.isclose(clipcore.global_norm(small.arrays), small.norm / 2, rel_tol=1e-5)
        else:
            assert all(np.array_equal(a, b) for a, b in zip(small.arrays, small.backup))


def test_numpy_baseline_agrees_with_clipcore(small):
    ref = [a.copy() for a in small.arrays]
    n1 = bench.numpy_clip_by_global_norm_(small.arrays, 0.5 * small.norm)
    n2 = clipcore.clip_by_global_norm_(ref, 0.5 * small.norm)
    assert math.isclose(n1, n2, rel_tol=1e-5)
    for a, b in zip(small.arrays, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("op", ["clip", "noclip", "clip_by_value", "relu", "clip_by_norm"])
def test_verify_catches_a_wrong_answer(op):
    data = bench.Data(SMALL if op in ("clip", "noclip") else (("x", (5000,)),), seed=1)
    correct = bench.calls("numpy", op, data, 1)["numpy"]
    data.restore()
    bench.verify(op, data, correct())
    data.restore()
    wrong = [a * np.float32(0.9) for a in data.arrays]      # e.g. scaled by the wrong factor
    with pytest.raises(AssertionError):
        bench.verify(op, data, wrong)
    data.restore()
    if op != "noclip":                                      # the op not applied at all
        with pytest.raises(AssertionError):
            bench.verify(op, data, None)


def test_elementwise_cases_run_clipcore_and_check_it(small):
    data = bench.Data((("x", (5000,)),), seed=1)
    for op in ("clip_by_value", "relu", "clip_by_norm"):
        calls = bench.calls("clipcore", op, data, 1)
        assert set(calls) == {"clipcore"}
        data.restore()
        bench.verify(op, data, calls["clipcore"]())


def run_worker(monkeypatch, capsys, spec):
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(spec)))
    bench._worker()
    lines = capsys.readouterr().out.splitlines()
    return [json.loads(line[len(bench._MARK):]) for line in lines if line.startswith(bench._MARK)]


def test_worker_reports_wrong_and_failing_implementations_as_errors(monkeypatch, capsys):
    spec = {"family": "numpy", "threads": 1, "repeat": 2, "warmup": 1, "seed": 0,
            "cases": [{"key": "mlp", "workload": "mlp", "op": "clip"}]}
    events = run_worker(monkeypatch, capsys, spec)
    assert [e["event"] for e in events] == ["ready", "data", "result"]
    assert events[-1]["status"] == "ok" and len(events[-1]["times_s"]) == 2

    monkeypatch.setitem(bench.CALL_FACTORIES, "numpy",
                        lambda op, data, threads: {"numpy": lambda: None})   # clips nothing
    (result,) = [e for e in run_worker(monkeypatch, capsys, spec) if e["event"] == "result"]
    assert result["status"] == "error" and "global norm after the call" in result["message"]

    def broken(op, data, threads):
        raise RuntimeError("no such device")
    monkeypatch.setitem(bench.CALL_FACTORIES, "numpy", broken)
    (result,) = [e for e in run_worker(monkeypatch, capsys, spec) if e["event"] == "result"]
    assert result["status"] == "error" and "RuntimeError: no such device" in result["message"]


def test_assemble_computes_ratios_and_ceilings():
    cases = bench.select_cases(["mlp", "relu"])
    events = {
        "clipcore": [{"event": "ceiling", "workload": "mlp", "values": 235146,
                      "read_s": [4e-5, 1e-5, 3e-5], "rw_s": [2e-5, 2e-5, 1e-5],
                      "rw_alone_s": [3e-5, 2e-5, 4e-5]},
                     {"event": "result", "case": "mlp", "impl": "clipcore", "status": "ok",
                      "times_s": [4e-5, 5e-5, 6e-5]},
                     {"event": "result", "case": "mlp", "impl": "clipcore Plan", "status": "ok",
                      "times_s": [3e-5, 3e-5, 9e-5]},
                     {"event": "result", "case": "relu", "impl": "clipcore",
                      "status": "not in this clipcore"}],
        "numpy": [{"event": "result", "case": "mlp", "impl": "numpy", "status": "ok",
                   "times_s": [1e-4, 1e-4, 1e-4]},
                  {"event": "result", "case": "relu", "impl": "numpy", "status": "error",
                   "message": "AssertionError: relu differs"}],
    }
    families = {"clipcore": {"status": "ok"}, "numpy": {"status": "ok"},
                "torch": {"status": "not installed"}, "tensorflow": {"status": "not installed"}}
    r = bench.assemble(cases, events, families, threads=2, repeat=3, warmup=1)
    mlp, relu = r["cases"]
    assert mlp["ceiling"]["kind"] == "read+rw"
    assert math.isclose(mlp["ceiling"]["best_s"], 3e-5)      # the fastest read + rw probe
    assert math.isclose(mlp["results"]["clipcore"]["pct_ceiling"], 60.0)
    assert math.isclose(mlp["results"]["clipcore"]["gbps"], 3 * 4 * 235146 / 5e-5 / 1e9)
    assert math.isclose(mlp["speedup"]["numpy"]["clipcore"], 2.0)
    assert math.isclose(mlp["speedup"]["numpy"]["clipcore Plan"], 1e-4 / 3e-5)
    assert mlp["results"]["torch"]["status"] == "not installed"
    assert relu["ceiling"] is None                      # no probe ran for that workload
    assert relu["results"]["clipcore"]["status"] == "not in this clipcore"
    assert "clipcore Plan" not in relu["results"]
    assert relu["results"]["numpy"]["message"] == "AssertionError: relu differs"
    assert relu["speedup"] == {}
    quiet = dict(r["machine"], load_average=[0.1, 0.2], other_load=0.05)
    table = bench.format_table(dict(r, machine=quiet))
    assert "2.00x, Plan 3.33x" in table and "not installed" in table
    assert "error: AssertionError: relu differs" in table
    assert "warning" not in table
    busy = dict(quiet, other_load=0.9)
    assert "other processes kept 0.90 CPUs busy" in bench.format_table(dict(r, machine=busy))


def test_in_place_ops_get_the_read_write_pass_that_ran_alone():
    # An in-place op right after the restore also writes the restored data back
    # from the cache; the read-write pass that follows the probe's read pass
    # does not, so it is no ceiling for that op.
    cases = bench.select_cases(["relu", "clip_by_norm"])
    events = {"clipcore": [{"event": "ceiling", "workload": "elementwise", "values": 1 << 24,
                            "read_s": [2e-3, 3e-3], "rw_s": [1e-3, 2e-3],
                            "rw_alone_s": [1.5e-3, 1.4e-3]}]}
    r = bench.assemble(cases, events, {"clipcore": {"status": "ok"}}, threads=2, repeat=1,
                       warmup=1)
    relu, by_norm = r["cases"]
    assert relu["ceiling"]["kind"] == "rw" and math.isclose(relu["ceiling"]["best_s"], 1.4e-3)
    assert by_norm["ceiling"]["kind"] == "read+rw"
    assert math.isclose(by_norm["ceiling"]["best_s"], 3e-3)


# --- a --quick run end to end, NumPy only ------------------------------------

def check_schema(r, repeat):
    assert r["schema"] == "clipcore-bench/2"
    assert r["repeat"] == repeat and isinstance(r["threads"], int) and r["threads"] >= 1
    m = r["machine"]
    for key in ("cpu", "logical_cpus", "available_cpus", "threads", "simd", "openmp",
                "platform", "python", "numpy", "clipcore", "load_average", "other_load"):
        assert key in m
    assert m["other_load"] is None or m["other_load"] >= 0
    assert m["simd"] == clipcore.kernels.simd_path() and m["clipcore"] == clipcore.__version__
    assert set(r["families"]) == {"clipcore", "numpy", "torch", "tensorflow", "jax"}
    for w, c in r["ceilings"].items():
        assert c["bytes"] == 4 * c["values"]
        per_count = 2 * repeat * len({r["threads"], 1})       # the run's threads and one
        assert len(c["read_s"]) == len(c["rw_s"]) == len(c["rw_alone_s"]) == per_count
    for case in r["cases"]:
        for key in ("key", "label", "workload", "op", "tensors", "values", "bytes",
                    "traffic_bytes", "params", "ceiling", "results", "speedup"):
            assert key in case
        assert set(case["results"]) <= set(IMPLS)
        if case["ceiling"]:
            c = r["ceilings"][case["workload"]]
            probes = {"read": c["read_s"], "rw": c["rw_alone_s"],
                      "read+rw": [a + b for a, b in zip(c["read_s"], c["rw_s"])]}
            assert case["ceiling"]["best_s"] == min(probes[case["ceiling"]["kind"]])
        for impl, res in case["results"].items():
            assert res["status"] in STATUSES
            if res["status"] == "ok":
                assert len(res["times_s"]) == repeat and res["median_s"] > 0
                assert math.isclose(res["gbps"], case["traffic_bytes"] / res["median_s"] / 1e9)
                assert res["pct_ceiling"] > 0
        for peer, ups in case["speedup"].items():
            for impl, x in ups.items():
                assert math.isclose(x, case["results"][peer]["median_s"]
                                    / case["results"][impl]["median_s"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results"
    r = run_cli("bench", "--quick", "--out", str(out))
    return r, out


def test_quick_run_with_numpy_only(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/" in r.stderr                        # progress
    table = r.stdout
    for label in ("2000x512", "MNIST MLP", "ResNet-50", "GPT-2 small", "GPT-2, no clip needed",
                  "clip_by_value 16M", "relu 16M", "clip_by_norm 16M"):
        assert f"\n{label}: " in table
    runs = 2 if clipcore.kernels.max_threads() > 1 else 1    # 1 thread, then all of them
    assert table.count("torch          not installed") == 7 * runs      # all but clip_by_norm
    assert table.count("tensorflow     not installed") == 8 * runs
    assert table.count("jax            not installed") == 5 * runs      # the global-norm cases
    if runs == 2:
        assert "1 thread for everyone" in table
    assert "SIMD " + clipcore.kernels.simd_path() in table
    assert "matplotlib is not installed" in table
    assert not (out / "chart.png").exists()
    assert (out / "table.txt").read_text().strip() in table


def test_quick_run_json(quick_run):
    r, out = quick_run
    results = json.loads((out / "results.json").read_text())
    check_schema(results, repeat=5)
    assert results["quick"] is True
    assert results["families"]["torch"]["status"] == "not installed"
    assert results["families"]["numpy"]["status"] == "ok"
    cases = {c["key"]: c for c in results["cases"]}
    assert len(cases) == len(bench.CASES)
    for key in ("2000x512", "mlp", "resnet50", "gpt2", "gpt2-noclip"):
        c = cases[key]
        for impl in ("clipcore", "clipcore Plan", "numpy"):
            assert c["results"][impl]["status"] == "ok"
        assert set(c["speedup"]["numpy"]) == {"clipcore", "clipcore Plan"}
        assert c["ceiling"]["kind"] == ("read" if key == "gpt2-noclip" else "read+rw")
    assert cases["gpt2"]["values"] == 124_439_808 and cases["resnet50"]["tensors"] == 161
    if clipcore.kernels.max_threads() > 1:          # the 1-thread run, against its own ceiling
        one = results["one_thread"]
        check_schema(one, repeat=5)
        assert one["threads"] == 1 and one["families"]["numpy"]["threads"] == 1
        assert {c["key"] for c in one["cases"]} == set(cases)
    assert cases["gpt2"]["params"]["clip_norm"] * 4 == pytest.approx(
        cases["gpt2-noclip"]["params"]["clip_norm"])
    for key in ("clip_by_value", "relu", "clip_by_norm"):
        assert cases[key]["results"]["numpy"]["status"] == "ok"


@pytest.mark.requires_matplotlib
def test_chart_with_matplotlib(tmp_path):
    r = run_cli("bench", "--workload", "mlp", "--repeat", "2", "--threads", "1",
                "--out", str(tmp_path), hide="torch,tensorflow,optax")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    check_schema(results, repeat=2)
    assert results["threads"] == 1 and results["families"]["numpy"]["threads"] == 1


def test_default_out_dir_is_created_in_the_working_directory(tmp_path):
    r = run_cli("bench", "--workload", "mlp", "--repeat", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("bench-results-")
    assert (folder / "results.json").exists()


@pytest.mark.parametrize("n", [0, 5, 100_000])
def test_bandwidth_probe_passes(n):
    from clipcore import kernels
    x = np.arange(n, dtype=np.float32)
    for square in (False, True):         # a plain sum, the norm's loop
        t_read, t_rw = kernels.bandwidth_probe(x, 2, square=square)
        assert t_read >= 0 and t_rw >= 0
        np.testing.assert_array_equal(x, np.arange(n, dtype=np.float32))   # x *= 1
    out = np.full(n, -1.0, np.float32)
    assert kernels.bandwidth_probe(x, 2, read=False, out=out)[0] is None
    np.testing.assert_array_equal(out, x)                              # the copy probe
    wrong = np.full(n + 1, -1.0, np.float32)
    with pytest.raises(ValueError, match="out"):
        kernels.bandwidth_probe(x, 1, out=wrong)
    assert (wrong == -1.0).all()                                        # checked before any pass


def test_contend_runs_a_busy_process_only_while_timing(tmp_path):
    def busy():
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return out.count("while time.monotonic() < end")
    before = busy()
    r = run_cli("bench", "--workload", "mlp", "--repeat", "2", "--threads", "1", "--contend",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "while a busy process loads one core (--contend)" in r.stdout
    assert json.loads((tmp_path / "results.json").read_text())["contend"] is True
    assert busy() == before
