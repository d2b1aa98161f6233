"""The bench's cases: the data of each workload, the operations on it, and the check of an answer.

A case is one group of rows in the table: an operation (``OPS``) on a
workload's data (``DATA``). Adding a workload is one entry in ``CASES`` (and
one in ``DATA`` for new shapes).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import clipcore
from clipcore import workloads

# The elementwise ops work on one tensor of 16M values (issue 3's size).
ELEMENTWISE = (("x", (1 << 24,)),)

DATA = {name: workloads.WORKLOADS[name] for name in ("mlp", "2000x512", "resnet50", "gpt2")}
DATA["elementwise"] = ELEMENTWISE


class Op(NamedTuple):
    ceiling: str    # the probe it is measured against: "read", "rw" or "read+rw"
    passes: int     # passes over the data the op needs at the least


OPS = {
    "clip": Op("read+rw", 3),           # norm: read; scale: read + write
    "noclip": Op("read", 1),            # norm only: nothing to write
    "clip_by_value": Op("rw", 2),       # in place
    "relu": Op("rw", 2),                # in place
    "clip_by_norm": Op("read+rw", 3),   # norm, then write a new tensor
}


@dataclass(frozen=True)
class Case:
    """One row group of the table: an operation on a workload's data."""
    key: str          # id in the JSON and for --workload
    label: str        # row label in the table
    workload: str     # key of DATA
    op: str           # key of OPS

    @property
    def values(self):
        return workloads.n_values([shape for _, shape in DATA[self.workload]])

    @property
    def traffic_bytes(self):
        """The bytes the operation must move at the least."""
        return OPS[self.op].passes * 4 * self.values


CASES = (
    Case("2000x512", "2000x512", "2000x512", "clip"),
    Case("mlp", "MNIST MLP", "mlp", "clip"),
    Case("resnet50", "ResNet-50", "resnet50", "clip"),
    Case("gpt2", "GPT-2 small", "gpt2", "clip"),
    Case("gpt2-noclip", "GPT-2, no clip needed", "gpt2", "noclip"),
    Case("clip_by_value", "clip_by_value 16M", "elementwise", "clip_by_value"),
    Case("relu", "relu 16M", "elementwise", "relu"),
    Case("clip_by_norm", "clip_by_norm 16M", "elementwise", "clip_by_norm"),
)


def select_cases(names=None):
    """Cases for --workload names (workloads or case keys); all cases for None.

    Raises ValueError naming the unknown name.
    """
    if not names:
        return list(CASES)
    choices = sorted(set(DATA) | {c.key for c in CASES})
    for name in names:
        if name not in choices:
            raise ValueError(f"unknown workload {name!r} (choose from {', '.join(choices)})")
    return [c for c in CASES if c.key in names or c.workload in names]


class Data:
    """A workload's working arrays, their backup and its parameters.

    The working arrays are views of one buffer, ``work``, and the backup
    arrays views of another, ``flat``. ``restore()`` copies the backup into
    the working arrays; the ceiling probe runs over ``work`` after a restore,
    so it finds the memory in the state every timed call finds it in (just
    written: dirty in the cache). ``threads`` is the run's thread count
    (None: what OpenMP may use).
    """

    def __init__(self, workload, seed=0, n_threads=None):
        spec = DATA[workload] if isinstance(workload, str) else workload
        shp = workloads.shapes([shape for _, shape in spec])
        self.threads = n_threads
        self.names = [name for name, _ in spec]
        self.flat = np.empty(workloads.n_values(shp), np.float32)
        self.work = np.empty_like(self.flat)
        self.backup, self.arrays, pos = [], [], 0
        for shape in shp:
            n = int(np.prod(shape, dtype=np.int64))
            self.backup.append(self.flat[pos:pos + n].reshape(shape))
            self.arrays.append(self.work[pos:pos + n].reshape(shape))
            pos += n
        workloads.fill_gradients(self.backup, seed)
        self.restore()
        self.norm = clipcore.global_norm(self.backup, n_threads=n_threads)
        n = max(self.flat.size, 1)
        half = 0.6745 * self.norm / math.sqrt(n)   # ~ median |x| for normal values
        self.params = {"clip": {"clip_norm": self.norm / 2},
                       "noclip": {"clip_norm": self.norm * 2},
                       "clip_by_value": {"lo": -half, "hi": half},
                       "relu": {},
                       "clip_by_norm": {"clip_norm": self.norm / 2}}

    @property
    def x(self):
        """The first working array: what the elementwise ops work on."""
        return self.arrays[0]

    def restore(self):
        for a, b in zip(self.arrays, self.backup):
            np.copyto(a, b)


def verify(op, data, out):
    """Raise AssertionError if out (None: data.arrays) is not op applied once to the backup.

    Global-norm ops are checked by the norm of the output (all of it) and the
    values of a sample of the first tensor; elementwise ops on a sample of
    the values (every 61st), so checking stays cheap next to the op itself.
    """
    outs = data.arrays if out is None else [np.asarray(t) for t in out]
    p = data.params[op]
    got = outs[0].reshape(-1)[::61].astype(np.float64)
    x = data.backup[0].reshape(-1)[::61].astype(np.float64)
    if op in ("clip", "noclip"):
        want_norm = p["clip_norm"] if op == "clip" else data.norm
        norm = clipcore.global_norm(outs)
        assert math.isclose(norm, want_norm, rel_tol=1e-3), \
            f"global norm after the call is {norm:.6g}, expected {want_norm:.6g}"
        want = x * min(1.0, p["clip_norm"] / data.norm)
    elif op == "clip_by_value":
        want = np.clip(x, np.float32(p["lo"]), np.float32(p["hi"]))
    elif op == "relu":
        want = np.maximum(x, 0)
    else:
        want = x * (p["clip_norm"] / max(data.norm, p["clip_norm"]))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=0), \
        f"{op}: the output differs from the input {'clipped' if op != 'relu' else 'rectified'}"
