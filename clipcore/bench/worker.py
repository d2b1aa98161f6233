"""A bench worker: one family's long-lived process, driven by the runner over a pipe.

The runner writes one JSON command per line; the worker answers each with
one JSON line. The first line names the family, its thread count and the
seed; the worker sets its threads, imports its framework and answers
``{"event": "ready", ...}``. Then:

``{"cmd": "load", "workload": w}``
    drop the data held so far, make the workload's (``cases.Data``); answers
    its parameters.
``{"cmd": "setup", "op": op}``
    drop the calls of the previous case, make the family's calls for op;
    answers each implementation's status ("ok", or "error" with a message).
``{"cmd": "time", "impl": impl, "calls": n, "warmup": w}``
    w untimed calls, then n timed ones, each on restored data; the output of
    the last is checked (``cases.verify``). Answers their seconds, or an
    error. The ceiling's calls each run every probe once; it answers each
    probe's median over its n calls, so that its fastest probe is timed as
    the implementations are (a minimum over many probes would be biased low).
``{"cmd": "free"}``
    drop the data and the calls.

End of input ends the worker.
"""
import gc
import json
import os
import sys

import numpy as np

from clipcore.bench import impls
from clipcore.bench.cases import Data, verify


class Worker:
    """One family's state between commands: its data and the current case's calls."""

    def __init__(self, family, threads, seed):
        self.family = impls.FAMILY[family]
        self.threads, self.seed = threads, seed
        self.data = self.op = None
        self.calls = {}

    def ready(self):
        version, reported = self.family.configure(self.threads)
        return {"event": "ready", "family": self.family.name, "version": version,
                "threads": reported}

    def free(self):
        self.data = self.op = None
        self.calls = {}
        gc.collect()     # GPT-2's arrays and the peers' copies of them: 1-2 GB
        return {"event": "freed"}

    def load(self, workload):
        self.free()
        self.data = Data(workload, self.seed, self.threads)
        return {"event": "loaded", "workload": workload, "params": self.data.params,
                "norm": self.data.norm}

    def setup(self, op):
        self.calls = {}
        gc.collect()
        self.op, status = op, {}
        for impl in self.family.impls:
            if op not in impl.ops:
                continue
            try:
                self.calls[impl.name] = impls.make_call(impl.name, op, self.data)
            except ImportError as exc:   # a module only this op needs (ml_dtypes)
                status[impl.name] = {"status": "not installed", "message": _message(exc)}
            except Exception as exc:   # a peer that fails to set up
                status[impl.name] = {"status": "error", "message": _message(exc)}
            else:
                status[impl.name] = {"status": "ok"}
        return {"event": "setup", "op": op, "impls": status}

    def time(self, impl, calls, warmup):
        call, out = self.calls[impl], None
        try:
            if impls.IMPLS[impl].self_timed:
                for _ in range(warmup):
                    call()
                runs = [call() for _ in range(calls)]
                times = [float(np.median(probe)) for probe in zip(*runs)]
            else:
                times, out = impls.measure(call, self.data.restore, calls, warmup)
                verify(self.op, self.data, out)
        except Exception as exc:
            return {"event": "times", "impl": impl, "status": "error", "message": _message(exc)}
        finally:
            del out     # TensorFlow's outputs of GPT-2 hold 500 MB
        return {"event": "times", "impl": impl, "status": "ok", "times_s": times}

    def handle(self, cmd):
        if cmd["cmd"] == "load":
            return self.load(cmd["workload"])
        if cmd["cmd"] == "setup":
            return self.setup(cmd["op"])
        if cmd["cmd"] == "time":
            return self.time(cmd["impl"], cmd["calls"], cmd["warmup"])
        if cmd["cmd"] == "free":
            return self.free()
        raise ValueError(f"unknown command {cmd['cmd']!r}")


def _message(exc):
    return f"{type(exc).__name__}: {exc}"


def serve(commands, replies):
    """Answer the commands (lines of JSON) read from commands on replies, until end of input."""
    def answer(reply):
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    spec = json.loads(commands.readline())
    worker = Worker(spec["family"], spec["threads"], spec["seed"])
    answer(worker.ready())
    for line in iter(commands.readline, ""):
        answer(worker.handle(json.loads(line)))


def main():
    """The worker process's entry point: commands on stdin, answers on the original stdout.

    Anything else written to stdout (by a framework's C code too) goes to
    stderr, so the answers stay whole lines of JSON.
    """
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
