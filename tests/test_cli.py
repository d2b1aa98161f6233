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
from clipcore import bench, kernels
from clipcore.__main__ import main
from clipcore.bench import impls, report, runner, worker
from clipcore.bench.cases import as_float32

IMPLS_BY_NAME = impls.IMPLS
from clipcore.bench._probe import bandwidth_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(clipcore.__file__)))
IMPLS = ("ceiling", "clipcore", "clipcore Plan", "numpy", "torch", "tensorflow", "jax")
STATUSES = {"ok", "not installed", "no equivalent", "error"}


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
    return bench.Data(SMALL, seed=2, n_threads=2)


def test_measure_restores_before_every_call_outside_the_timing():
    log = []
    times, out = bench.measure(lambda: log.append("call") or "out",
                               lambda: log.append("restore"), repeat=4, warmup=2)
    assert log == ["restore", "call"] * 6
    assert len(times) == 4 and all(t >= 0 for t in times) and out == "out"


def test_the_tables_have_one_entry_per_implementation_and_case():
    assert list(bench.IMPLS) == list(IMPLS)
    assert [f.name for f in bench.FAMILIES] == ["clipcore", "numpy", "torch", "tensorflow",
                                                "jax"]
    assert {c.op for c in bench.CASES} == set(bench.OPS)
    assert set(bench.IMPLS["ceiling"].ops) == set(bench.OPS)      # every op has a ceiling
    for impl in bench.IMPLS.values():
        assert set(impl.ops) <= set(bench.OPS)


@pytest.mark.parametrize("impl", ["clipcore", "clipcore Plan", "numpy"])
@pytest.mark.parametrize("op", ["clip", "noclip"])
def test_every_repeat_clips_fresh_data(small, impl, op):
    call = bench.make_call(impl, op, small)
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


BATCH = (("w", (8, 5, 3)), ("b", (8, 5)))


@pytest.mark.parametrize("op", ["clip", "noclip", "clip_by_value", "relu", "clip_by_norm",
                                "agc", "per_example", "clip_bf16"])
def test_verify_catches_a_wrong_answer(op):
    if op == "clip_bf16":
        pytest.importorskip("ml_dtypes")        # clipcore's bfloat16 row reads through it
    data = bench.Data(BATCH if op == "per_example" else SMALL if op in (
        "clip", "noclip", "agc", "clip_bf16") else (("x", (5000,)),), seed=1,
        dtype="bfloat16" if op == "clip_bf16" else None, batched=op == "per_example")
    correct = bench.make_call("clipcore" if op == "clip_bf16" else "numpy", op, data)
    data.restore()
    out = correct()
    bench.verify(op, data, out)
    data.restore()
    wrong = [as_float32(a) * np.float32(0.9)                # e.g. scaled by the wrong factor
             for a in (out or data.arrays)]
    with pytest.raises(AssertionError):
        bench.verify(op, data, wrong)
    data.restore()
    if op != "noclip":                                      # the op not applied at all
        with pytest.raises(AssertionError):
            bench.verify(op, data, None)


@pytest.mark.parametrize("op", ["agc", "per_example", "clip_bf16"])
def test_every_installed_implementation_of_issue_16s_ops_passes_the_check(op):
    data = bench.Data(BATCH if op == "per_example" else SMALL, seed=2,
                      dtype="bfloat16" if op == "clip_bf16" else None,
                      batched=op == "per_example")
    ran = []
    for name, impl in IMPLS_BY_NAME.items():
        family = bench.FAMILIES[[f.name for f in bench.FAMILIES].index(impls.IMPL_FAMILY[name])]
        if op not in impl.ops or impl.self_timed or (family.module and not impls.installed(
                family.module)):
            continue
        if op == "clip_bf16" and not impls.installed("ml_dtypes"):
            continue
        data.restore()
        bench.verify(op, data, bench.make_call(name, op, data)())
        ran.append(name)
    assert "clipcore" in ran or op == "clip_bf16"


def test_elementwise_cases_run_clipcore_and_check_it():
    data = bench.Data((("x", (5000,)),), seed=1)
    for op in ("clip_by_value", "relu", "clip_by_norm"):
        assert bench.make_call("clipcore Plan", op, data) is None     # lists only
        call = bench.make_call("clipcore", op, data)
        data.restore()
        bench.verify(op, data, call())


@pytest.mark.parametrize("kind, read, probes", [("read+rw", True, 8), ("read", True, 8),
                                                ("rw", False, 4), ("read+read+rw", True, 8)])
def test_ceiling_probes_every_variant_after_a_restore(monkeypatch, small, kind, read, probes):
    # The plain loops and the tuned ones, the run's threads and one, and for a
    # read pass the plain sum and the norm's loop; each on restored data.
    log = []
    tuned = kernels.get_tuning()

    def probe(buf, n_threads, *, read, square):
        assert buf is small.work and all(np.array_equal(a, b)
                                         for a, b in zip(small.arrays, small.backup))
        small.arrays[0][0] += 1.0            # the next probe must find it restored
        log.append((kernels.get_tuning()["prefetch"], n_threads, read, square))
        return (1.0 if read else None), 2.0
    monkeypatch.setattr(impls, "bandwidth_probe", probe)
    seconds = bench.make_call("ceiling", {"read+rw": "clip", "read": "noclip", "rw": "relu",
                                          "read+read+rw": "agc"}[kind], small)()
    assert seconds == [{"read+rw": 3.0, "read": 1.0, "rw": 2.0, "read+read+rw": 4.0}[kind]] * probes
    squares = (False, True) if read else (False,)
    assert sorted(log) == sorted((pf, nt, read, sq) for pf in (False, tuned["prefetch"])
                                 for nt in (1, 2) for sq in squares)
    assert kernels.get_tuning() == tuned


def serve(commands):
    """Run a worker in this process over commands; returns its answers."""
    replies = io.StringIO()
    worker.serve(io.StringIO("".join(json.dumps(c) + "\n" for c in commands)), replies)
    return [json.loads(line) for line in replies.getvalue().splitlines()]


def test_worker_answers_each_command(small):
    ready, loaded, setup, timed, ceiling, freed = serve([
        {"family": "clipcore", "threads": 2, "seed": 0},
        {"cmd": "load", "workload": "mlp"}, {"cmd": "setup", "op": "clip"},
        {"cmd": "time", "impl": "clipcore Plan", "calls": 3, "warmup": 1},
        {"cmd": "time", "impl": "ceiling", "calls": 3, "warmup": 0}, {"cmd": "free"}])
    assert ready == {"event": "ready", "family": "clipcore", "version": clipcore.__version__,
                     "threads": 2}
    assert loaded["params"]["clip"]["clip_norm"] == pytest.approx(loaded["norm"] / 2)
    assert setup["impls"] == {"ceiling": {"status": "ok"}, "clipcore": {"status": "ok"},
                              "clipcore Plan": {"status": "ok"}}
    assert timed["status"] == "ok" and len(timed["times_s"]) == 3
    assert ceiling["status"] == "ok" and len(ceiling["times_s"]) == 8    # one per probe
    assert freed == {"event": "freed"}


def test_the_ceiling_answers_each_probes_median_over_the_calls(monkeypatch):
    # Its fastest probe is then timed as the rows are (the median of a
    # round's calls), not picked as the luckiest of many single runs.
    runs = iter([[3.0, 9.0], [1.0, 7.0], [2.0, 8.0], [0.5, 0.5]])
    monkeypatch.setattr(impls, "probe_ceiling", lambda data, kind: next(runs))
    *_, ceiling, _ = serve([
        {"family": "clipcore", "threads": 1, "seed": 0},
        {"cmd": "load", "workload": "mlp"}, {"cmd": "setup", "op": "clip"},
        {"cmd": "time", "impl": "ceiling", "calls": 3, "warmup": 0}, {"cmd": "free"}])
    assert ceiling["times_s"] == [2.0, 8.0]


def test_worker_reports_wrong_and_failing_implementations_as_errors(monkeypatch):
    commands = [{"family": "numpy", "threads": 1, "seed": 0},
                {"cmd": "load", "workload": "mlp"}, {"cmd": "setup", "op": "clip"},
                {"cmd": "time", "impl": "numpy", "calls": 2, "warmup": 1}]
    answers = serve(commands)
    assert [a["event"] for a in answers] == ["ready", "loaded", "setup", "times"]
    assert answers[-1]["status"] == "ok" and len(answers[-1]["times_s"]) == 2

    ops = bench.IMPLS["numpy"].ops
    monkeypatch.setitem(ops, "clip", ("", lambda d, p: lambda: None))   # clips nothing
    result = serve(commands)[-1]
    assert result["status"] == "error" and "global norm after the call" in result["message"]

    def broken(d, p):
        raise RuntimeError("no such device")
    monkeypatch.setitem(ops, "clip", ("", broken))
    setup = serve(commands[:3])[-1]
    assert setup["impls"] == {"numpy": {"status": "error",
                                        "message": "RuntimeError: no such device"}}

    def needs_a_module(d, p):
        import clipcore_no_such_module  # noqa: F401
    monkeypatch.setitem(ops, "clip", ("", needs_a_module))
    setup = serve(commands[:3])[-1]
    assert setup["impls"]["numpy"]["status"] == "not installed"
    assert "clipcore_no_such_module" in setup["impls"]["numpy"]["message"]


# --- the rounds --------------------------------------------------------------

class FakeWorker:
    """A worker's pipe, answered here: each time command gets the seconds of
    seconds[impl][round] for every call, and lands in log."""

    def __init__(self, family, log, seconds, die_at=None):
        self.family, self.log, self.seconds, self.die_at = family, log, seconds, die_at
        self.rounds, self.pending, self.closed = {}, [], False

    def send(self, cmd):
        self.pending.append(cmd)

    def receive(self):
        cmd = self.pending.pop(0)
        self.log.append((self.family, cmd))
        if cmd["cmd"] == self.die_at:
            raise runner.WorkerDied(f"{self.family} worker exited with code -9: killed")
        if cmd["cmd"] == "load":
            return {"event": "loaded", "params": {"clip": {"clip_norm": 1.0}}}
        if cmd["cmd"] == "setup":
            return {"event": "setup", "impls": {impl.name: {"status": "ok"}
                                                for impl in impls.FAMILY[self.family].impls
                                                if cmd["op"] in impl.ops}}
        if cmd["cmd"] == "time":
            r = self.rounds[cmd["impl"]] = self.rounds.get(cmd["impl"], -1) + 1
            return {"event": "times", "impl": cmd["impl"], "status": "ok",
                    "times_s": [self.seconds[cmd["impl"]][r]] * cmd["calls"]}
        return {"event": "freed"}

    def ask(self, **cmd):
        self.send(cmd)
        return self.receive()

    def close(self):
        self.closed = True
        return 0.5


# Round 2 runs at half the bandwidth: every time doubles, the ratios stay.
SECONDS = {"ceiling": [1.0, 2.0, 1.0, 2.0, 1.0], "clipcore": [2.0, 4.0, 2.0, 4.0, 2.0],
           "clipcore Plan": [1.0, 2.0, 1.0, 2.0, 1.0], "numpy": [4.0, 8.0, 4.0, 8.0, 4.0]}


def measure_fake(cases, repeat, die_at=None):
    log = []
    families = {"clipcore": {"status": "ok"}, "numpy": {"status": "ok"},
                **{f: {"status": "not installed"} for f in ("torch", "tensorflow", "jax")}}
    workers = {"clipcore": FakeWorker("clipcore", log, SECONDS),
               "numpy": FakeWorker("numpy", log, SECONDS, die_at)}
    fakes = dict(workers)
    measured, params = runner.measure_cases(cases, workers, families, repeat=repeat, warmup=2,
                                            progress=runner.Progress(0, io.StringIO()))
    return log, families, fakes, measured, params


def test_each_round_asks_every_implementation_in_turn():
    cases = bench.select_cases(["mlp"])
    log, families, fakes, measured, params = measure_fake(cases, repeat=13)
    assert bench.rounds_of(13) == [2, 3, 2, 3, 3]      # rounds of at most 3 calls
    assert [cmd["cmd"] for _, cmd in log[:4]] == ["load", "load", "setup", "setup"]
    timed = [(fam, cmd) for fam, cmd in log if cmd["cmd"] == "time"]
    order = ["ceiling", "clipcore", "clipcore Plan", "numpy"]
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert len(rounds) == 5
    for r, (this_round, calls) in enumerate(zip(rounds, bench.rounds_of(13))):
        # every implementation once, in the opposite order every other round
        assert [cmd["impl"] for _, cmd in this_round] == (order if r % 2 == 0 else order[::-1])
        assert all(cmd["calls"] == calls for _, cmd in this_round)
        assert all(cmd["warmup"] == (2 if r == 0 else 0) for _, cmd in this_round)
    assert [cmd["cmd"] for _, cmd in log[-2:]] == ["free", "free"]
    assert params == {"mlp": {"clip": {"clip_norm": 1.0}}}
    row = measured.rows["mlp", "numpy"]
    assert row["status"] == "ok" and row["rounds_s"][1] == [8.0, 8.0, 8.0]


def test_ratios_are_taken_within_each_round():
    cases = bench.select_cases(["mlp"])
    _, families, _, measured, params = measure_fake(cases, repeat=15)
    r = bench.assemble(cases, measured, families, params, threads=2, repeat=15, warmup=2)
    (mlp,) = r["cases"]
    assert mlp["ceiling"]["status"] == "ok" and mlp["ceiling"]["kind"] == "read+rw"
    assert mlp["ceiling"]["best_s"] == 1.0
    assert mlp["ceiling"]["per_round_s"] == SECONDS["ceiling"]
    cc, plan, numpy_ = (mlp["results"][k] for k in ("clipcore", "clipcore Plan", "numpy"))
    assert cc["median_s"] == 2.0 and (cc["min_s"], cc["max_s"]) == (2.0, 4.0)
    assert len(cc["times_s"]) == 15 and cc["rounds_s"][1] == [4.0] * 3
    assert math.isclose(cc["gbps"], 3 * 4 * 235146 / 2.0 / 1e9)
    # Each round's ratio is the same, although the times moved between rounds.
    assert cc["pct_ceiling"] == {"median": 50.0, "min": 50.0, "max": 50.0, "rounds": [50.0] * 5}
    assert plan["pct_ceiling"]["median"] == 100.0
    assert mlp["speedup"]["numpy"]["clipcore"] == {"median": 2.0, "min": 2.0, "max": 2.0,
                                                   "rounds": [2.0] * 5}
    assert mlp["speedup"]["numpy"]["clipcore Plan"]["rounds"] == [4.0] * 5
    assert numpy_["pct_ceiling"]["rounds"] == [25.0] * 5
    assert mlp["results"]["torch"]["status"] == "not installed"
    quiet = dict(r["machine"], load_average=[0.1, 0.2], other_load=0.05)
    table = bench.format_table(dict(r, machine=quiet))
    assert "2.00x (2.00-2.00), Plan 4.00x (4.00-4.00)" in table
    assert "50% (50-50)" in table and "2.00-4.00 s" in table
    assert "in 5 rounds (3+3+3+3+3 calls)" in table
    assert "warning" not in table
    busy = dict(quiet, other_load=0.9)
    assert "other processes kept 0.90 CPUs busy" in bench.format_table(dict(r, machine=busy))


def test_a_ratio_comes_from_the_rounds_not_from_the_overall_medians():
    cases = bench.select_cases(["mlp"])
    measured = runner.Measurement()
    for impl, rounds_s in (("ceiling", [[1.0], [3.0], [3.0]]),
                           ("clipcore", [[2.0], [4.0], [4.0]]),
                           ("clipcore Plan", [[2.0], [4.0], [4.0]]),
                           ("numpy", [[4.0], [5.0], [6.0]])):
        measured.start(cases[0], impl, "ok")
        for times in rounds_s:
            measured.record(cases[0], {"impl": impl, "status": "ok", "times_s": times})
    r = bench.assemble(cases, measured, {"clipcore": {"status": "ok"},
                                         "numpy": {"status": "ok"}}, {}, threads=1, repeat=3,
                       warmup=1)
    (mlp,) = r["cases"]
    up = mlp["speedup"]["numpy"]["clipcore"]
    assert up["rounds"] == [2.0, 1.25, 1.5] and up["median"] == 1.5   # medians' ratio: 1.25
    assert (up["min"], up["max"]) == (1.25, 2.0)
    assert mlp["results"]["clipcore"]["pct_ceiling"]["rounds"] == [50.0, 75.0, 75.0]


def test_a_worker_that_dies_fails_its_rows_and_the_others_go_on():
    cases = bench.select_cases(["mlp", "relu"])
    log, families, fakes, measured, params = measure_fake(cases, repeat=3, die_at="setup")
    assert families["numpy"]["status"] == "error" and fakes["numpy"].closed
    assert "numpy worker exited with code -9: killed" in families["numpy"]["message"]
    assert families["numpy"]["seconds"] == 0.5
    assert not [cmd for fam, cmd in log if fam == "numpy" and cmd["cmd"] == "time"]
    r = bench.assemble(cases, measured, families, params, threads=1, repeat=3, warmup=1)
    mlp, relu = r["cases"]
    assert mlp["results"]["clipcore"]["status"] == "ok"
    assert mlp["results"]["numpy"]["status"] == "error"
    assert "killed" in mlp["results"]["numpy"]["message"]
    assert relu["results"]["numpy"]["status"] == "error"
    assert relu["results"]["jax"]["status"] == "no equivalent"
    assert "clipcore Plan" not in relu["results"] and mlp["speedup"] == {}
    assert relu["ceiling"]["kind"] == "rw"
    assert report.failures(r) == [("MNIST MLP", "numpy"), ("relu 16M", "numpy")]
    table = bench.format_table(r)
    assert "numpy          error: numpy worker exited with code -9: killed" in table


# --- a --quick run end to end, NumPy only ------------------------------------

def check_schema(r, repeat):
    assert r["schema"] == "clipcore-bench/3"
    assert r["repeat"] == repeat and isinstance(r["threads"], int) and r["threads"] >= 1
    assert sum(r["rounds"]) == repeat and r["rounds"] == bench.rounds_of(repeat)
    m = r["machine"]
    for key in ("cpu", "logical_cpus", "available_cpus", "threads", "simd", "openmp",
                "platform", "python", "numpy", "clipcore", "load_average", "other_load"):
        assert key in m
    assert m["other_load"] is None or m["other_load"] >= 0
    assert m["simd"] == clipcore.kernels.simd_path() and m["clipcore"] == clipcore.__version__
    assert set(r["families"]) == {"clipcore", "numpy", "torch", "tensorflow", "jax"}
    for case in r["cases"]:
        for key in ("key", "label", "workload", "op", "tensors", "values", "bytes",
                    "traffic_bytes", "params", "ceiling", "results", "speedup"):
            assert key in case
        assert set(case["results"]) <= set(IMPLS) - {"ceiling"}
        c = case["ceiling"]
        assert c["status"] == "ok" and c["kind"] == bench.OPS[case["op"]].ceiling
        assert len(c["rounds_s"]) == len(r["rounds"])
        assert c["best_s"] == min(c["times_s"]) == min(c["per_round_s"])
        assert c["per_round_s"] == [min(ts) for ts in c["rounds_s"]]
        for impl, res in case["results"].items():
            assert res["status"] in STATUSES
            if res["status"] == "ok":
                assert [len(ts) for ts in res["rounds_s"]] == r["rounds"]
                assert len(res["times_s"]) == repeat and res["median_s"] > 0
                assert res["min_s"] <= res["median_s"] <= res["max_s"]
                assert math.isclose(res["gbps"], case["traffic_bytes"] / res["median_s"] / 1e9)
                pct = res["pct_ceiling"]
                assert pct["rounds"] == pytest.approx(
                    [100 * cr / t for cr, t in zip(c["per_round_s"], res["per_round_s"])])
                assert pct["min"] <= pct["median"] <= pct["max"]
        for peer, ups in case["speedup"].items():
            for impl, x in ups.items():
                assert x["rounds"] == pytest.approx(
                    [p / t for p, t in zip(case["results"][peer]["per_round_s"],
                                           case["results"][impl]["per_round_s"])])


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
                  "clip_by_value 16M", "relu 16M", "clip_by_norm 16M", "GPT-2 small, bfloat16",
                  "AGC, ResNet-50 (timm's units)", "per-example clip, MLP, batch 64"):
        assert f"\n{label}: " in table
    runs = 2 if clipcore.kernels.max_threads() > 1 else 1    # 1 thread, then all of them
    assert table.count("torch          not installed\n") == 10 * runs    # all but clip_by_norm
    assert table.count("tensorflow     not installed\n") == 8 * runs     # the TF-named ops
    assert table.count("jax            not installed\n") == 6 * runs     # global and per-example
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
    for key in ("clip_by_value", "relu", "clip_by_norm", "agc", "per_example"):
        assert cases[key]["results"]["numpy"]["status"] == "ok"
    for key in ("agc", "per_example", "gpt2-bf16"):
        assert cases[key]["results"]["clipcore"]["status"] == (
            "not installed" if key == "gpt2-bf16" and not impls.installed("ml_dtypes") else "ok")
    assert cases["agc"]["ceiling"]["kind"] == "read+read+rw"
    assert cases["gpt2-bf16"]["traffic_bytes"] == 3 * 2 * 124_439_808      # 2 bytes a value


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
    x = np.arange(n, dtype=np.float32)
    for square in (False, True):         # a plain sum, the norm's loop
        t_read, t_rw = bandwidth_probe(x, 2, square=square)
        assert t_read >= 0 and t_rw >= 0
        np.testing.assert_array_equal(x, np.arange(n, dtype=np.float32))   # x *= 1
    assert bandwidth_probe(x, 2, read=False)[0] is None
    for read in (False, True):
        out = np.full(n, -1.0, np.float32)
        assert (bandwidth_probe(x, 2, read=read, out=out)[0] is None) == (not read)
        np.testing.assert_array_equal(out, x)                          # the copy probe
    wrong = np.full(n + 1, -1.0, np.float32)
    with pytest.raises(ValueError, match="out"):
        bandwidth_probe(x, 1, out=wrong)
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
