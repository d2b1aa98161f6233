"""The runner: one worker process per family, measured in rounds, and the results built from them.

Every family's worker loads a workload at the same time; then, for each case
of the workload, the runner goes round: in each round every implementation
(the ceiling included) makes a few timed calls in turn, in the opposite
order every other round. The memory bandwidth of a shared machine swings
within seconds, so times measured a minute apart are not comparable, but
times of one round are: the speed-ups and ``% ceiling`` are computed per
round, from the round's medians (the ceiling's: its fastest probe's), and
reported as the median and range of those ratios.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

import clipcore
from clipcore import kernels
from clipcore.bench import impls
from clipcore.bench.cases import DATA, OPS

SCHEMA = "clipcore-bench/3"
CALLS_PER_ROUND = 3    # an implementation's timed calls in one round, at most


def rounds_of(repeat):
    """The timed calls of each round: repeat calls in rounds of at most CALLS_PER_ROUND."""
    n = -(-repeat // CALLS_PER_ROUND)
    return [repeat * (r + 1) // n - repeat * r // n for r in range(n)]


class WorkerDied(Exception):
    """A worker process ended or answered nonsense; the message says how."""


class WorkerProcess:
    """One family's worker process (clipcore.bench.worker), asked one command at a time."""

    def __init__(self, family, threads, seed):
        self.family, self.start = family, time.perf_counter()
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from clipcore.bench.worker import main; main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
            env=_worker_env(threads), cwd=_package_root())   # imports this very clipcore
        self.send({"family": family, "threads": threads, "seed": seed})

    def send(self, cmd):
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass        # the reply's read says why

    def receive(self):
        line = self.proc.stdout.readline()
        try:
            return json.loads(line)
        except ValueError:
            pass
        if line:        # not an answer: the worker is of no more use
            self.proc.kill()
        rc = self.proc.wait()
        self.err.seek(0)
        tail = " | ".join(self.err.read().strip().splitlines()[-3:])
        raise WorkerDied(f"{self.family} worker exited with code {rc}: {tail}")

    def ask(self, **cmd):
        self.send(cmd)
        return self.receive()

    def close(self):
        """End the process (at the end of its input); returns its wall time in seconds."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()
        return time.perf_counter() - self.start


def _package_root():
    """The folder holding the clipcore package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(clipcore.__file__)))


def _worker_env(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    return env


class Progress:
    """A progress bar on a terminal; one line per finished step elsewhere."""

    def __init__(self, total, stream=None, width=28):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""

    def show(self, label):
        self.label = label
        if self.tty:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:40]:<40}")
            self.stream.flush()

    def step(self, label):
        self.done += 1
        if self.tty:
            self.show(label)
        else:
            self.stream.write(f"[{self.done}/{self.total}] {label}\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 90) + "\r")
            self.stream.flush()


class Measurement:
    """What the rounds gave each (case, implementation): status, and the seconds per round."""

    def __init__(self):
        self.rows = {}     # (case key, impl) -> {"status", "rounds_s" | "message"}

    def start(self, case, impl, status, message=None):
        self.rows[case.key, impl] = ({"status": "ok", "rounds_s": []} if status == "ok"
                                     else {"status": status, "message": message})

    def live(self, case, impl):
        return self.rows.get((case.key, impl), {}).get("status") == "ok"

    def record(self, case, reply):
        row = self.rows[case.key, reply["impl"]]
        if reply["status"] == "ok":
            row["rounds_s"].append(reply["times_s"])
        else:
            row.clear()
            row.update(status="error", message=reply["message"])

    def fail(self, case, impl, message):
        self.rows[case.key, impl] = {"status": "error", "message": message}


def _drop(workers, families, family, exc):
    """Stop a worker that died: its family is an error, with the worker's last words."""
    seconds = workers.pop(family).close()
    families.setdefault(family, {"version": None, "threads": None})
    families[family].update(status="error", message=str(exc), seconds=seconds)


def measure_cases(cases, workers, families, *, repeat, warmup, progress):
    """Every case with every worker's implementations, in rounds; returns (Measurement, params).

    A worker that dies is dropped (see _drop), its rows of the case under way
    fail with its message, and the others go on.
    """
    measured, params, sizes = Measurement(), {}, rounds_of(repeat)

    def ask_all(cmd, case=None):
        """Send cmd to every worker, then collect the answers: {family: answer}."""
        for w in workers.values():
            w.send(cmd)
        answers = {}
        for family, w in list(workers.items()):
            try:
                answers[family] = w.receive()
            except WorkerDied as exc:
                lost(family, exc, case)
        return answers

    def lost(family, exc, case):
        _drop(workers, families, family, exc)
        for impl in impls.FAMILY[family].impls:
            if case is not None and measured.live(case, impl.name):
                measured.fail(case, impl.name, str(exc))

    for workload in dict.fromkeys(c.workload for c in cases):
        progress.show(f"preparing {workload}")
        loaded = ask_all({"cmd": "load", "workload": workload})
        if "clipcore" in loaded:
            params[workload] = loaded["clipcore"]["params"]
        for case in (c for c in cases if c.workload == workload):
            order = []
            for answer in ask_all({"cmd": "setup", "op": case.op}).values():
                for impl, s in answer["impls"].items():
                    measured.start(case, impl, s["status"], s.get("message"))
                    order += [impl] if s["status"] == "ok" else []
            for r, n in enumerate(sizes):
                for impl in order if r % 2 == 0 else order[::-1]:
                    family = impls.IMPL_FAMILY[impl]
                    if not measured.live(case, impl):
                        continue
                    try:
                        answer = workers[family].ask(cmd="time", impl=impl, calls=n,
                                                     warmup=warmup if r == 0 else 0)
                    except WorkerDied as exc:
                        lost(family, exc, case)
                        continue
                    measured.record(case, answer)
                    progress.step(f"{impl}: {case.label}, round {r + 1}/{len(sizes)}")
        ask_all({"cmd": "free"})
    return measured, params


def run(cases, *, threads, repeat, warmup=1, seed=0, progress=None, argv=None, quick=False):
    """Measure every case with every family available; returns the results dict."""
    load_before = _load_average()
    busy_before, own_before, wall_before = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    families, workers = {}, {}
    progress = progress or Progress(0)
    try:
        for f in impls.FAMILIES:
            if f.module is None or impls.installed(f.module):
                workers[f.name] = WorkerProcess(f.name, threads, seed)
            else:
                families[f.name] = {"status": "not installed", "version": None, "threads": None}
        progress.total = len(rounds_of(repeat)) * sum(
            1 for c in cases for f in workers for impl in impls.FAMILY[f].impls
            if c.op in impl.ops)
        progress.show("starting the workers")
        for family, w in list(workers.items()):
            try:
                ready = w.receive()
            except WorkerDied as exc:
                _drop(workers, families, family, exc)
                continue
            families[family] = {"status": "ok", "version": ready["version"],
                                "threads": ready["threads"]}
        measured, params = measure_cases(cases, workers, families, repeat=repeat,
                                         warmup=warmup, progress=progress)
    finally:
        for family, w in workers.items():
            seconds = w.close()
            if family in families:
                families[family]["seconds"] = seconds
        progress.close()
    results = assemble(cases, measured, families, params, threads=threads, repeat=repeat,
                       warmup=warmup, argv=argv, quick=quick)
    results["machine"]["load_average"] = [load_before, _load_average()]
    busy = _cpu_busy_s()
    results["machine"]["other_load"] = None if busy is None else round(max(
        0.0, (busy - busy_before) - (_own_cpu_s() - own_before))
        / (time.perf_counter() - wall_before), 2)
    return results


# ---------------------------------------------------------------------------
# The results

def _median(xs):
    return float(np.median(xs))


def spread(per_round):
    """The median and the range of a ratio computed in each round, and those ratios."""
    return {"median": _median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds": list(per_round)}


def round_value(impl, times):
    """What one round of an implementation counts as: the median of its calls;
    the ceiling's fastest probe (times holds each probe's median over the
    round's calls: worker.py)."""
    return min(times) if impls.IMPLS[impl].self_timed else _median(times)


def _row(case, impl, measured, families):
    """The results entry of impl on case: its call, status, and its times when "ok"."""
    family = impls.IMPL_FAMILY[impl]
    r = {"family": family, "call": impls.IMPLS[impl].ops[case.op][0]}
    row = measured.rows.get((case.key, impl))
    if row is None:
        fam = families.get(family, {})
        if fam.get("status") == "not installed":
            return dict(r, status="not installed")
        return dict(r, status="error", message=fam.get("message", "no result from the worker"))
    if row["status"] == "not installed":
        return dict(r, status="not installed", message=row.get("message"))
    if row["status"] != "ok" or not row["rounds_s"]:
        return dict(r, status="error", message=row.get("message", "not measured"))
    times = [t for rs in row["rounds_s"] for t in rs]
    return dict(r, status="ok", times_s=times, rounds_s=row["rounds_s"], min_s=min(times),
                max_s=max(times), per_round_s=[round_value(impl, rs) for rs in row["rounds_s"]])


def assemble(cases, measured, families, params, *, threads, repeat, warmup, argv=None,
             quick=False):
    """Build the results dict (schema clipcore-bench/3) from the rounds' measurements."""
    out_cases = []
    for case in cases:
        traffic = case.traffic_bytes
        ceiling = dict(_row(case, "ceiling", measured, families), kind=OPS[case.op].ceiling)
        if ceiling["status"] == "ok":
            ceiling.update(best_s=ceiling["min_s"], gbps=traffic / ceiling["min_s"] / 1e9)
        results = {}
        for impl, family in impls.IMPL_FAMILY.items():
            if impls.IMPLS[impl].self_timed:
                continue
            if case.op not in impls.IMPLS[impl].ops:
                if family != "clipcore":
                    results[impl] = {"family": family, "call": None, "status": "no equivalent"}
                continue
            r = results[impl] = _row(case, impl, measured, families)
            if r["status"] == "ok":
                r["median_s"] = _median(r["times_s"])
                r["gbps"] = traffic / r["median_s"] / 1e9
                r["pct_ceiling"] = None if ceiling["status"] != "ok" else spread(
                    [100 * c / t for c, t in zip(ceiling["per_round_s"], r["per_round_s"])])
        speedup = {}
        for peer in impls.PEERS:
            if results.get(peer, {}).get("status") == "ok":
                speedup[peer] = {impl: spread([p / t for p, t in zip(
                    results[peer]["per_round_s"], results[impl]["per_round_s"])])
                                 for impl in impls.OURS
                                 if results.get(impl, {}).get("status") == "ok"}
        out_cases.append({"key": case.key, "label": case.label, "workload": case.workload,
                          "op": case.op, "tensors": len(DATA[case.workload]),
                          "values": case.values, "bytes": case.itemsize * case.values,
                          "traffic_bytes": traffic,
                          "params": params.get(case.workload, {}).get(case.op, {}),
                          "ceiling": ceiling, "results": results, "speedup": speedup})
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": list(argv or []), "quick": quick, "repeat": repeat, "warmup": warmup,
            "rounds": rounds_of(repeat), "threads": threads, "machine": machine_info(threads),
            "families": families, "cases": out_cases}


# ---------------------------------------------------------------------------
# The machine

def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo, macOS sysctl, else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(threads):
    """The facts the table and the JSON name: CPU, cores, threads, SIMD path."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "available_cpus": available,
            "threads": threads, "simd": kernels.simd_path(), "openmp": kernels.openmp_enabled(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "clipcore": clipcore.__version__}


def _cpu_busy_s():
    """CPU seconds all processes have used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    """CPU seconds used by this process and its finished workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load_average():
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


CONTEND_NOTE = " while a busy process loads one core (--contend)"


class Contention:
    """A busy process on one core while the bench runs (``--contend``): what a
    data-loader worker or another trainer does to a training step."""

    CODE = ("import os, time\n"
            "cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []\n"
            "if len(cpus) > 1: os.sched_setaffinity(0, cpus[-1:])\n"
            "end = time.monotonic() + 6 * 3600\n"
            "while time.monotonic() < end: pass\n")

    def __init__(self, on):
        self.on, self.proc = on, None

    def __enter__(self):
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE])
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
