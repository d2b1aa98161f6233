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
# DP-SGD's per-example gradients: the MLP's, for a batch of 64 examples.
BATCHED = {"mlp-b64"}
DATA["mlp-b64"] = tuple((name, (64,) + shape) for name, shape in DATA["mlp"])
# Mixed-precision training's gradients: GPT-2's in bfloat16.
DATA["gpt2-bf16"] = DATA["gpt2"]
DTYPE = {"gpt2-bf16": "bfloat16"}     # a workload's element type, when not float32


class Op(NamedTuple):
    ceiling: str    # the probe it is measured against: "read", "rw" or "read+rw"
    passes: int     # passes over the data the op needs at the least


OPS = {
    "clip": Op("read+rw", 3),           # norm: read; scale: read + write
    "agc": Op("read+read+rw", 4),       # unit norms: read grads and params; scale: read + write
    "per_example": Op("read", 1),       # norms and weighted sums: the batch read once at least
    "clip_bf16": Op("read+rw", 3),      # as "clip", on bfloat16 gradients
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
    def itemsize(self):
        return 2 if DTYPE.get(self.workload) == "bfloat16" else 4

    @property
    def traffic_bytes(self):
        """The bytes the operation must move at the least."""
        return OPS[self.op].passes * self.itemsize * self.values


CASES = (
    Case("2000x512", "2000x512", "2000x512", "clip"),
    Case("mlp", "MNIST MLP", "mlp", "clip"),
    Case("resnet50", "ResNet-50", "resnet50", "clip"),
    Case("gpt2", "GPT-2 small", "gpt2", "clip"),
    Case("gpt2-noclip", "GPT-2, no clip needed", "gpt2", "noclip"),
    Case("clip_by_value", "clip_by_value 16M", "elementwise", "clip_by_value"),
    Case("relu", "relu 16M", "elementwise", "relu"),
    Case("clip_by_norm", "clip_by_norm 16M", "elementwise", "clip_by_norm"),
    Case("gpt2-bf16", "GPT-2 small, bfloat16", "gpt2-bf16", "clip_bf16"),
    Case("agc", "AGC, ResNet-50 (timm's units)", "resnet50", "agc"),
    Case("per_example", "per-example clip, MLP, batch 64", "mlp-b64", "per_example"),
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


def bf16_bits(x):
    """float32 values rounded to bfloat16 (to nearest, ties to even), as uint16 bits."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def as_float32(a):
    """The values of a working or backup array as float32 (bfloat16 bits widened)."""
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a


class Data:
    """A workload's working arrays, their backup and its parameters.

    The working arrays are views of one buffer, ``work``, and the backup
    arrays views of another, ``flat``. ``restore()`` copies the backup into
    the working arrays; the ceiling probe runs over ``probe_buffer`` (``work``
    as float32) after a restore, so it finds the memory in the state every
    timed call finds it in (just written: dirty in the cache). ``threads`` is
    the run's thread count (None: what OpenMP may use). A bfloat16 workload's
    arrays hold the bits as uint16 (NumPy has no bfloat16); ``typed()``
    gives them as ``ml_dtypes.bfloat16`` arrays. ``dtype`` and ``batched``
    (the first axis is a batch of examples) default to the named workload's.
    """

    def __init__(self, workload, seed=0, n_threads=None, *, dtype=None, batched=None):
        spec = DATA[workload] if isinstance(workload, str) else workload
        shp = workloads.shapes([shape for _, shape in spec])
        self.threads, self.seed = n_threads, seed
        self.names = [name for name, _ in spec]
        named = isinstance(workload, str)
        self.dtype = dtype or (DTYPE.get(workload, "float32") if named else "float32")
        store = np.uint16 if self.dtype == "bfloat16" else np.float32
        self.flat = np.empty(workloads.n_values(shp), store)
        self.work = np.empty_like(self.flat)
        self.backup, self.arrays, pos = [], [], 0
        for shape in shp:
            n = int(np.prod(shape, dtype=np.int64))
            self.backup.append(self.flat[pos:pos + n].reshape(shape))
            self.arrays.append(self.work[pos:pos + n].reshape(shape))
            pos += n
        if store is np.float32:
            workloads.fill_gradients(self.backup, seed)
        else:
            values = [np.empty(shape, np.float32) for shape in shp]
            workloads.fill_gradients(values, seed)
            for b, v in zip(self.backup, values):
                b[...] = bf16_bits(v)
            del values
        self.probe_buffer = self.work[:self.work.size // 2 * 2].view(np.float32) \
            if store is np.uint16 else self.work
        self.restore()
        self.norm = clipcore.global_norm([as_float32(b) for b in self.backup],
                                         n_threads=n_threads)
        n = max(self.flat.size, 1)
        half = 0.6745 * self.norm / math.sqrt(n)   # ~ median |x| for normal values
        self.params = {"clip": {"clip_norm": self.norm / 2},
                       "noclip": {"clip_norm": self.norm * 2},
                       "clip_bf16": {"clip_norm": self.norm / 2},
                       "clip_by_value": {"lo": -half, "hi": half},
                       "relu": {},
                       "clip_by_norm": {"clip_norm": self.norm / 2},
                       "agc": {"clipping": 0.01, "eps": 1e-3}}
        self._weights = self._example_norms = None
        if batched or (batched is None and named and workload in BATCHED):
            # the median example is clipped
            self.params["per_example"] = {"l2_norm_clip": float(np.median(self.example_norms()))}

    @property
    def x(self):
        """The first working array: what the elementwise ops work on."""
        return self.arrays[0]

    @property
    def weights(self):
        """Parameters for AGC, one float32 array per gradient (made at first use)."""
        if self._weights is None:
            self._weights = [np.empty(a.shape, np.float32) for a in self.arrays]
            workloads.fill_gradients(self._weights, self.seed + 1)
        return self._weights

    def typed(self):
        """The working arrays in the workload's element type (bfloat16: ml_dtypes views)."""
        if self.dtype == "float32":
            return self.arrays
        import ml_dtypes
        return [a.view(ml_dtypes.bfloat16) for a in self.arrays]

    def example_norms(self):
        """Each example's norm over all arrays (the backup's first axis is the batch;
        computed at first use: the backup never changes)."""
        if self._example_norms is None:
            self._example_norms = np.sqrt(sum(
                np.einsum("ij,ij->i", b.reshape(len(b), -1), b.reshape(len(b), -1),
                          dtype=np.float64) for b in self.backup))
        return self._example_norms

    def restore(self):
        for a, b in zip(self.arrays, self.backup):
            np.copyto(a, b)


def timm_units(x):
    """timm's unit norms: over all axes but the first (the whole of a 0-d or 1-d x)."""
    x = np.asarray(x, np.float64)
    if x.ndim <= 1:
        return np.sqrt(np.sum(x * x))
    return np.sqrt(np.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def verify(op, data, out):
    """Raise AssertionError if out (None: data.arrays) is not op applied once to the backup.

    Global-norm ops are checked by the norm of the output (all of it) and the
    values of a sample of the first tensor; elementwise ops, AGC and the
    per-example sums on a sample of the values (every 61st), so checking
    stays cheap next to the op itself.
    """
    outs = [as_float32(a) for a in data.arrays] if out is None else [np.asarray(t) for t in out]
    p = data.params[op]
    got = outs[0].reshape(-1)[::61].astype(np.float64)
    first = as_float32(data.backup[0]).astype(np.float64)
    x = first.reshape(-1)[::61]
    # bfloat16: torch rounds its norm and its factor to bfloat16 too
    rtol, atol = (2.0 ** -7 if data.dtype == "bfloat16" else 1e-4), 0.0
    if op in ("clip", "noclip", "clip_bf16"):
        want_norm = data.norm if op == "noclip" else p["clip_norm"]
        norm = clipcore.global_norm(outs)
        assert math.isclose(norm, want_norm, rel_tol=max(rtol, 1e-3)), \
            f"global norm after the call is {norm:.6g}, expected {want_norm:.6g}"
        want = x * min(1.0, p["clip_norm"] / data.norm)
    elif op == "clip_by_value":
        want = np.clip(x, np.float32(p["lo"]), np.float32(p["hi"]))
    elif op == "relu":
        want = np.maximum(x, 0)
    elif op == "agc":
        g_norm, w_norm = timm_units(first), timm_units(data.weights[0])
        max_norm = p["clipping"] * np.maximum(w_norm, p["eps"])
        want = np.where(g_norm < max_norm, first, first * (max_norm / np.maximum(g_norm, 1e-6)))
        want = want.reshape(-1)[::61]
    elif op == "per_example":
        norms = data.example_norms()
        c = p["l2_norm_clip"]
        mult = np.where(norms > c, c / np.where(norms > 0, norms, 1.0), 1.0)
        want = np.tensordot(mult, first, axes=1).reshape(-1)[::61]
        atol = 1e-6 * np.abs(want).max()      # sums that cancel: float32 sums may differ there
    else:
        want = x * (p["clip_norm"] / max(data.norm, p["clip_norm"]))
    assert got.shape == want.shape and np.allclose(got, want, rtol=rtol, atol=atol), \
        f"{op}: the output differs from the input {'clipped' if op != 'relu' else 'rectified'}"
