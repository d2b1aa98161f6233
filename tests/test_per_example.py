"""Per-example clipping (optax, Opacus) and adaptive gradient clipping (optax, timm)."""
import numpy as np
import pytest

import clipcore

DTYPES = [np.float32, np.float64]
THREADS = [1, 2, 7]


def _grads(batch, shapes, dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch,) + s) * scale).astype(dtype) for s in shapes]


def _ref_per_example(grads, clip):
    """optax's formula in float64 NumPy: multipliers min(clip / norm, 1), zero norm 1."""
    b = grads[0].shape[0]
    norms = np.sqrt(sum(np.sum(g.astype(np.float64).reshape(b, -1) ** 2, axis=1)
                        for g in grads))
    with np.errstate(divide="ignore", invalid="ignore"):
        mult = np.where(norms > clip, clip / norms, 1.0)
    sums = [np.tensordot(mult, g.astype(np.float64), axes=1) for g in grads]
    return sums, int(np.sum(norms > clip)), norms


def _snapshot(arrays):
    return [a.tobytes() for a in arrays]


# ------------------------------------------------------ per_example_global_norm_clip

SHAPES = [(3, 4), (5,), (2, 3, 2), ()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [0.0, 0.5, 2.0, 5.0, np.inf])
@pytest.mark.parametrize("batch", [1, 6, 33])
def test_values_match_reference(dtype, clip, batch, twins):
    grads = _grads(batch, SHAPES, dtype)
    before = _snapshot(grads)
    sums, n = clipcore.per_example_global_norm_clip(grads, clip)
    ref, n_ref, _ = _ref_per_example(grads, clip)
    assert n == n_ref and isinstance(n, int)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for s, r, g in zip(sums, ref, grads):
        assert s.dtype == dtype and s.shape == g.shape[1:]
        np.testing.assert_allclose(s, r, rtol=tol, atol=tol * batch)
    assert _snapshot(grads) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_across_threads(dtype):
    grads = _grads(37, [(300, 700), (31,), (5000,)], dtype, seed=1)
    results = [clipcore.per_example_global_norm_clip(grads, 3.0, n_threads=nt)
               for nt in THREADS]
    for sums, n in results[1:]:
        assert n == results[0][1]
        for a, b in zip(sums, results[0][0]):
            assert a.tobytes() == b.tobytes()


def test_empty_batch_and_empty_list():
    grads = [np.zeros((0, 3, 2), np.float32), np.zeros((0,), np.float64)]
    sums, n = clipcore.per_example_global_norm_clip(grads, 1.0)
    assert n == 0
    assert sums[0].shape == (3, 2) and not sums[0].any() and sums[0].dtype == np.float32
    assert sums[1].shape == () and sums[1] == 0
    assert clipcore.per_example_global_norm_clip([], 1.0) == ([], 0)


def test_zero_norm_and_zero_clip():
    g = [np.array([[0.0, 0.0], [3.0, 4.0]])]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.0)
    assert n == 1 and (sums[0] == 0).all()
    sums, n = clipcore.per_example_global_norm_clip(g, 10.0)
    assert n == 0 and sums[0].tolist() == [3.0, 4.0]


def test_nan_and_inf_norms_poison_the_sums():
    g = [np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 1.0]], np.float32)]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.5)
    assert np.isnan(sums[0]).all() and n == 2          # the NaN example is not counted
    g = [np.array([[1.0, 0.0], [np.inf, 0.0]])]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.5)
    assert np.isnan(sums[0]).all() and n == 2          # inf > 0.5: counted


def test_float64_norms_are_range_safe():
    g = [np.array([[1e200, 1e200], [1e-200, 0.0]]), np.array([[1e200], [0.0]])]
    sums, n = clipcore.per_example_global_norm_clip(g, 1.0)
    norm0 = 1e200 * np.sqrt(3.0)
    np.testing.assert_allclose(sums[0], [1e200 / norm0 + 1e-200, 1e200 / norm0], rtol=1e-14)
    assert n == 1


def test_float16_runs_on_a_float32_copy():
    g = _grads(8, [(4, 3), (2,)], np.float16)
    sums, n = clipcore.per_example_global_norm_clip(g, 1.0)
    ref, n_ref, _ = _ref_per_example([x.astype(np.float32) for x in g], 1.0)
    assert n == n_ref
    for s, r in zip(sums, ref):
        assert s.dtype == np.float16
        np.testing.assert_allclose(s.astype(np.float64), r, rtol=2e-3, atol=2e-3)


def test_strided_and_transposed_inputs():
    base = _grads(10, [(6, 8)], np.float64, seed=3)[0]
    views = [base[:, ::2, 1::3], np.asfortranarray(base), base.transpose(0, 2, 1)]
    sums, n = clipcore.per_example_global_norm_clip(views, 1.5)
    ref, n_ref, _ = _ref_per_example([np.ascontiguousarray(v) for v in views], 1.5)
    assert n == n_ref
    for s, r in zip(sums, ref):
        np.testing.assert_allclose(s, r, rtol=1e-13, atol=1e-13)


def test_out_is_written_and_returned():
    g = _grads(5, [(3, 4), (7,)], np.float32)
    big = np.full((3, 8), -1.0, np.float32)
    out = [big[:, ::2], np.empty(7, np.float32)]          # a strided out, too
    sums, n = clipcore.per_example_global_norm_clip(g, 1.0, out=out)
    assert sums[0] is out[0] and sums[1] is out[1]
    ref, _, _ = _ref_per_example(g, 1.0)
    for s, r in zip(out, ref):
        np.testing.assert_allclose(s, r, rtol=2e-6, atol=1e-6)
    assert (big[:, 1::2] == -1).all()


def _bad_out_cases():
    g = _grads(4, [(3,), (2, 2)], np.float32)
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    shared = np.zeros(7, np.float32)
    return g, [
        ("not a list", "nope", TypeError, "out must be a list"),
        ("count", [np.zeros(3, np.float32)], ValueError, "out has 1 arrays"),
        ("shape", [np.zeros(4, np.float32), np.zeros((2, 2), np.float32)], ValueError,
         r"out\[0\]: expected shape \(3,\)"),
        ("dtype", [np.zeros(3), np.zeros((2, 2), np.float32)], TypeError,
         r"out\[0\]: expected dtype float32"),
        ("int", [np.zeros(3, np.int32), np.zeros((2, 2), np.float32)], TypeError, r"out\[0\]"),
        ("read-only", [ro, np.zeros((2, 2), np.float32)], ValueError,
         r"out\[0\]: expected a writable"),
        ("each other", [shared[:3], shared[2:6].reshape(2, 2)], ValueError,
         r"out\[0\] and out\[1\] share memory"),
        ("inputs", [g[0][1], np.zeros((2, 2), np.float32)], ValueError,
         r"out\[0\] shares memory with grads\[0\]"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_out_modifies_nothing(case):
    g, cases = _bad_out_cases()
    _, out, exc, match = cases[case]
    before = _snapshot(g)
    outs_before = _snapshot(out) if isinstance(out, list) else None
    with pytest.raises(exc, match=match):
        clipcore.per_example_global_norm_clip(g, 0.1, out=out)
    assert _snapshot(g) == before
    if outs_before is not None:
        assert _snapshot(out) == outs_before


@pytest.mark.parametrize("grads, exc, match", [
    (np.zeros((3, 2), np.float32), TypeError, "grads must be a list"),
    ("abc", TypeError, "grads must be a list"),
    ([np.zeros((3, 2)), np.zeros((4,))], ValueError, r"grads\[1\]: batch size 4"),
    ([np.zeros((3, 2), np.int64)], TypeError, r"grads\[0\]: expected a float16"),
    ([np.zeros((3,)), None], TypeError, r"grads\[1\]"),
    ([np.float64(1.0)], ValueError, r"grads\[0\]: expected a batch axis"),
])
def test_bad_grads(grads, exc, match):
    with pytest.raises(exc, match=match):
        clipcore.per_example_global_norm_clip(grads, 1.0)


@pytest.mark.parametrize("clip, exc", [(-1.0, ValueError), (np.nan, ValueError),
                                       ("1", TypeError), (None, TypeError)])
def test_bad_clip(clip, exc):
    with pytest.raises(exc, match="l2_norm_clip"):
        clipcore.per_example_global_norm_clip([np.ones((2, 2))], clip)


@pytest.mark.parametrize("n_threads, exc", [(0, ValueError), (1.5, TypeError)])
def test_bad_threads(n_threads, exc):
    with pytest.raises(exc, match="n_threads"):
        clipcore.per_example_global_norm_clip([np.ones((2, 2))], 1.0, n_threads=n_threads)


@pytest.mark.requires_jax
@pytest.mark.parametrize("clip", [0.0, 0.7, 3.0, np.inf])
def test_matches_optax(clip):
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    grads = _grads(9, [(4, 5), (5,), (2, 2, 3)], np.float32, seed=4)
    sums, n = clipcore.per_example_global_norm_clip(grads, clip)
    osums, on = optax.per_example_global_norm_clip([jnp.asarray(g) for g in grads], clip)
    assert n == int(on)
    for s, o in zip(sums, osums):
        np.testing.assert_allclose(s, np.asarray(o), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- torch: Opacus

def _opacus_models():
    import torch
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 2 * 2, 10))
    return {"mlp": mlp, "cnn": cnn}


def _opacus_step(model, batch, max_grad_norm, seed=0):
    """(params, Opacus's summed_grad) after a backward pass through GradSampleModule."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=max_grad_norm, expected_batch_size=batch)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    params = [p for p in gsm.parameters() if p.requires_grad]
    samples = [p.grad_sample.clone() for p in params]
    opt.clip_and_accumulate()
    expected = [p.summed_grad.clone() for p in params]
    for p, s in zip(params, samples):
        p.summed_grad = None
        p.grad_sample = s
    return params, expected


@pytest.mark.requires_opacus
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 100.0])
def test_clip_and_accumulate_matches_opacus(name, max_grad_norm):
    import clipcore.torch
    params, expected = _opacus_step(_opacus_models()[name], 16, max_grad_norm)
    clipcore.torch.clip_and_accumulate_(params, max_grad_norm)
    for p, e in zip(params, expected):
        assert p.summed_grad.dtype == e.dtype and p.summed_grad.shape == e.shape
        np.testing.assert_allclose(p.summed_grad.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
    # A second call adds to summed_grad, as Opacus's does.
    clipcore.torch.clip_and_accumulate_(params, max_grad_norm)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.summed_grad.numpy(), 2 * e.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.requires_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_and_accumulate_numpy_formula_and_threads(dtype):
    import torch
    import clipcore.torch
    grads = _grads(40, [(30, 50), (50,), (4000,)], getattr(np, dtype), seed=5)
    results = []
    for nt in THREADS:
        params = [torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=getattr(torch, dtype)))
                  for g in grads]
        for p, g in zip(params, grads):
            p.grad_sample = torch.from_numpy(g.copy())
        clipcore.torch.clip_and_accumulate_(params, 2.0, n_threads=nt)
        results.append([p.summed_grad.numpy().tobytes() for p in params])
    assert all(r == results[0] for r in results)
    _, _, norms = _ref_per_example(grads, 2.0)
    factor = np.minimum(2.0 / (norms + 1e-6), 1.0)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.summed_grad.numpy(), np.tensordot(factor, g, axes=1),
                                   rtol=tol, atol=tol)


@pytest.mark.requires_torch
def test_clip_and_accumulate_errors_and_fallback():
    import torch
    import clipcore.torch
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Per sample gradient not found"):
        clipcore.torch.clip_and_accumulate_([p], 1.0)
    p.grad_sample = torch.ones(4, 2)
    with pytest.raises(ValueError, match="grad_sample of shape"):
        clipcore.torch.clip_and_accumulate_([p], 1.0)
    q = torch.nn.Parameter(torch.zeros(3))
    p.grad_sample, q.grad_sample = torch.ones(4, 3), torch.ones(5, 3)
    p.summed_grad = torch.full((3,), 7.0)
    with pytest.raises(ValueError, match=r"grad_sample\[1\]: batch size 5"):
        clipcore.torch.clip_and_accumulate_([p, q], 1.0)
    assert (p.summed_grad == 7).all() and getattr(q, "summed_grad", None) is None
    # A list of per-batch grad samples is concatenated; bfloat16 goes to torch's ops.
    r = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    r.grad_sample = [torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.bfloat16)]
    clipcore.torch.clip_and_accumulate_([r], 100.0)
    assert r.summed_grad.tolist() == [3.0, 3.0]
    # Empty batch.
    s = torch.nn.Parameter(torch.zeros(2))
    s.grad_sample = torch.zeros(0, 2)
    clipcore.torch.clip_and_accumulate_([s], 1.0)
    assert s.summed_grad.tolist() == [0.0, 0.0]


# ------------------------------------------ the one-read path and the two passes

# Rows per block forced on clipcore._per_example's choice: 0 the two passes,
# else the one-read path (None: one block for the whole batch).
PATHS = {"two-pass": 0, "block4": 4, "block8": 8, "one-block": None}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    from clipcore import _per_example
    rows = PATHS[request.param]
    monkeypatch.setattr(_per_example, "_block_rows",
                        lambda xs, batch: -(-batch // 4) * 4 if rows is None else rows)
    return request.param


def _forced(monkeypatch, rows):
    from clipcore import _per_example
    monkeypatch.setattr(_per_example, "_block_rows", lambda xs, batch: rows)


def _mixed(batch, seed=7):
    """A list the kernels cut into many tiles, of both dtypes, a zero-width
    array, a strided (column step 2) and a transposed view among them."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((batch, 40, 30))
    return [rng.standard_normal((batch, 9000)).astype(np.float32),
            base[:, :, ::2].astype(np.float64)[:, :, :7], np.zeros((batch, 0), np.float32),
            base.transpose(0, 2, 1).astype(np.float32), rng.standard_normal((batch, 3))]


@pytest.mark.parametrize("batch", [1, 4, 5, 13, 37])
def test_paths_give_the_same_bits_for_any_thread_count(batch, monkeypatch, twins):
    grads = _mixed(batch)
    ref = None
    for rows in (0, 4, 8, -(-batch // 4) * 4):
        _forced(monkeypatch, rows)
        for nt in THREADS:
            sums, n = clipcore.per_example_global_norm_clip(grads, 9.0, n_threads=nt)
            got = ([a.tobytes() for a in sums], n)
            ref = ref or got
            assert got == ref, (rows, nt)
    want, n_want, _ = _ref_per_example(grads, 9.0)
    assert ref[1] == n_want
    for s, r in zip(sums, want):
        np.testing.assert_allclose(s, r, rtol=2e-6, atol=2e-6 * batch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_read_kernel_matches_the_two_passes(dtype, twins):
    from clipcore import _weighted as _w
    # 70001 columns: the weighted sums' wider tiles, a last one partial
    grads = [g.reshape(g.shape[0], -1)
             for g in _grads(21, [(5000,), (300, 31), (2,), (70001,)], dtype, seed=4)]
    add = [True, False, True, True]
    for rule, name in ((_w.RULE_OPTAX, "optax"), (_w.RULE_OPACUS, "opacus")):
        outs2 = [np.full(g.shape[1], 0.5, dtype) for g in grads]
        norms2 = np.sqrt(_w.row_sumsq(grads, 21, 2))
        w32, w64 = _w.weights(norms2, rule, 3.0, dtype == np.float64)
        _w.weighted_sum(grads, outs2, add, w32, w64, 1)
        for block in (4, 8, 24):
            outs = [np.full(g.shape[1], 0.5, dtype) for g in grads]
            norms = np.empty(21)
            assert _w.clip_sum(grads, outs, add, rule, 3.0,
                               dtype == np.float64, norms, block, 2), (name, block)
            assert norms.tobytes() == norms2.tobytes()
            assert [o.tobytes() for o in outs] == [o.tobytes() for o in outs2], (name, block)


def test_edge_norms_on_every_path(path):
    nan, inf = np.nan, np.inf
    g = [np.array([[1.0, 0.0], [nan, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, 0.0]], np.float32)]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.5)
    assert np.isnan(sums[0]).all() and n == 3          # NaN: not counted; zero: weight 1
    g = [np.array([[1.0, 0.0], [inf, 0.0]] + [[0.5, 0.5]] * 5)]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.5)
    assert np.isnan(sums[0]).all() and n == 7
    g = [np.zeros((6, 3), np.float32), np.zeros((6,), np.float64)]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.0)
    assert n == 0 and not sums[0].any() and sums[1] == 0
    g = [np.array([[3.0, 4.0]] * 9, np.float32)]
    sums, n = clipcore.per_example_global_norm_clip(g, 0.0)
    assert n == 9 and (sums[0] == 0).all()
    sums, n = clipcore.per_example_global_norm_clip([g[0][:1]], 1.0)      # B = 1
    assert n == 1 and sums[0].tolist() == [np.float32(0.6), np.float32(0.8)]
    sums, n = clipcore.per_example_global_norm_clip([np.zeros((5, 0))], 0.0)    # no columns
    assert n == 0 and sums[0].shape == (0,)


def test_float64_out_of_range_sums_on_every_path(path):
    # Example 0's squares overflow, example 5's underflow: the one-read path
    # gives way to the range-safe norms, nothing written before.
    g = [np.array([[1e200, 1e200]] + [[1.0, 2.0]] * 4 + [[1e-200, 0.0]]),
         np.array([[1e200]] + [[2.0]] * 4 + [[0.0]])]
    out = [np.full(2, 7.0), np.full(1, 7.0)]
    sums, n = clipcore.per_example_global_norm_clip(g, 1.0, out=out)
    norm0 = 1e200 * np.sqrt(3.0)
    np.testing.assert_allclose(sums[0], [1e200 / norm0 + 4 / 3 + 1e-200, 1e200 / norm0 + 8 / 3],
                               rtol=1e-14)
    assert n == 5


def test_block_rows_choice():
    from clipcore import _per_example
    small = [np.zeros((64, 1000), np.float32)]
    assert _per_example._block_rows(small, 64) == 64     # one block: the batch
    assert _per_example._block_rows(small, 10) == 12     # rounded up to four
    big = [np.zeros((2, _per_example._BLOCK_BYTES // 16 + 1), np.float32)]
    assert _per_example._block_rows(big, 2) == 0      # four examples exceed a block
    mid = [np.zeros((2, _per_example._BLOCK_BYTES // 32), np.float32)]
    assert _per_example._block_rows(mid, 64) == 8


@pytest.mark.requires_torch
@pytest.mark.parametrize("batch", [1, 6, 37])
def test_clip_and_accumulate_paths_agree(batch, monkeypatch):
    import torch
    import clipcore.torch
    grads = _mixed(batch, seed=2)
    results = []
    for rows in (0, 4, 8):
        _forced(monkeypatch, rows)
        for nt in THREADS:
            params = [torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=getattr(torch, g.dtype.name)))
                      for g in grads]
            for p, g in zip(params, grads):
                p.grad_sample = torch.from_numpy(np.array(g))
            params[1].summed_grad = torch.ones(params[1].shape, dtype=torch.float64)
            params[3].summed_grad = torch.full(params[3].shape, -2.0)
            clipcore.torch.clip_and_accumulate_(params, 4.0, n_threads=nt)
            results.append([p.summed_grad.numpy().tobytes() for p in params])
    assert all(r == results[0] for r in results)
    _, _, norms = _ref_per_example(grads, 4.0)
    factor = np.minimum(4.0 / (norms + 1e-6), 1.0)
    base = [0, 1, 0, -2, 0]
    for p, g, b in zip(params, grads, base):
        tol = 1e-12 if g.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(p.summed_grad.numpy(), b + np.tensordot(factor, g, axes=1),
                                   rtol=tol, atol=tol)


# ------------------------------------------------------------------------- AGC

def _ref_agc(g, p, clipping, eps, axes, norm_type=2.0):
    """The AGC formula (timm's and optax's) with the factor in the arrays' dtype."""
    t = g.dtype.type
    def unit(x):
        x = np.abs(x.astype(np.float64))
        if norm_type == np.inf:
            return x.max(axis=axes, keepdims=True)
        return np.sum(x ** norm_type, axis=axes, keepdims=True) ** (1 / norm_type)
    pn, gn = unit(p).astype(t), unit(g).astype(t)
    max_norm = np.maximum(pn, t(eps)) * t(clipping)
    with np.errstate(all="ignore"):
        return np.where(gn < max_norm, g, g * (max_norm / np.maximum(gn, t(1e-6))))


OPTAX_SHAPES = [((7,), (0,)), ((1, 9), (0, 1)), ((6, 5), (0,)), ((4, 3, 5), (0,)),
                ((3, 3, 4, 6), (0, 1, 2)), ((2, 2, 2, 3, 4), (0, 1, 2, 3)), ((), ())]


def _agc_pair(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    p = np.asarray(rng.standard_normal(shape)).astype(dtype)
    g = np.asarray(rng.standard_normal(shape) * rng.choice([1e-4, 1.0], size=shape)).astype(dtype)
    return g, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axes", OPTAX_SHAPES)
def test_adaptive_grad_clip_reference(dtype, shape, axes):
    g, p = _agc_pair(shape, dtype, 6)
    expected = _ref_agc(g, p, 0.05, 1e-3, axes)
    p_before = p.tobytes()
    out = clipcore.adaptive_grad_clip_([g], [p], 0.05)
    assert out[0] is g and p.tobytes() == p_before
    np.testing.assert_allclose(g, expected, rtol=2e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.requires_jax
@pytest.mark.parametrize("shape, axes", OPTAX_SHAPES)
def test_adaptive_grad_clip_matches_optax(shape, axes):
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    g, p = _agc_pair(shape, np.float32, 7)
    tx = optax.adaptive_grad_clip(0.05)
    upd, _ = tx.update([jnp.asarray(g)], tx.init([jnp.asarray(p)]), [jnp.asarray(p)])
    clipcore.adaptive_grad_clip_([g], [p], 0.05)
    np.testing.assert_allclose(g, np.asarray(upd[0]), rtol=1e-5, atol=1e-8)


def test_adaptive_grad_clip_bitwise_across_threads():
    g0, p = _agc_pair((64, 4096), np.float32, 8)
    results = []
    for nt in THREADS:
        g = g0.copy()
        clipcore.adaptive_grad_clip_([g], [p], 0.01, n_threads=nt)
        results.append(g.tobytes())
    assert len(set(results)) == 1 and results[0] != g0.tobytes()


def _agc_list():
    """A list that mixes what the fused kernels take (rows, columns, whole arrays,
    float32 and float64) with what they leave to the per-array path (float16, a
    transposed view, float32 grads of float64 params)."""
    rng = np.random.default_rng(10)
    shapes = [(40, 300), (3, 3, 8, 700), (2000,), (5, 4, 300), (1, 9), (6, 5)]
    dtypes = [np.float32, np.float64, np.float32, np.float32, np.float64, np.float16]
    grads = [np.asarray(rng.standard_normal(s) * rng.choice([1e-3, 1.0], size=s)).astype(d)
             for s, d in zip(shapes, dtypes)]
    params = [np.asarray(rng.standard_normal(s)).astype(d) for s, d in zip(shapes, dtypes)]
    grads.append(np.asarray(rng.standard_normal((300, 40)), np.float32).T)
    params.append(np.asarray(rng.standard_normal((40, 300)), np.float32))
    grads.append(np.asarray(rng.standard_normal((30, 20)) * 1e-3, np.float32))
    params.append(np.asarray(rng.standard_normal((30, 20)), np.float64))
    return grads, params


@pytest.mark.parametrize("layout", ["optax", "torch"])
def test_adaptive_clip_of_a_mixed_list(layout):
    from clipcore import _per_example
    units = _per_example._optax_axes if layout == "optax" else _per_example._torch_axes
    grads0, params = _agc_list()
    results = []
    for nt in THREADS:
        grads = [g.copy(order="K") for g in grads0]
        grads[6] = grads0[6].T.copy().T           # keep the transposed layout
        _per_example.adaptive_clip(grads, params, 0.05, 1e-3, layout, 2.0, nt)
        results.append(b"".join(g.tobytes() for g in grads))
    assert len(set(results)) == 1
    for g0, g, p in zip(grads0, grads, params):
        t = np.float32 if g0.dtype == np.float16 else g0.dtype    # float16 is clipped in float32
        expected = _ref_agc(g0.astype(t), p.astype(t), 0.05, 1e-3, units(g0.shape, "p"))
        rtol = {2: 1e-3, 4: 2e-6, 8: 1e-14}[g0.dtype.itemsize]
        atol = 1e-7 if g0.dtype == np.float16 else 0     # float16's subnormal spacing
        np.testing.assert_allclose(g, expected, rtol=rtol, atol=atol)
    assert any(not np.array_equal(g, g0) for g, g0 in zip(grads, grads0))


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_adaptive_grad_clip_float64_out_of_squares_range(scale):
    g0, p0 = _agc_pair((6, 50), np.float64, 11)
    g, p = g0 * scale, p0 * scale
    clipcore.adaptive_grad_clip_([g], [p], 0.05)
    # The formula is scale-free: clipping the scaled arrays is scaling the clipped ones.
    np.testing.assert_allclose(g / scale, _ref_agc(g0, p0, 0.05, 1e-3 / scale, (0,)),
                               rtol=1e-13)


@pytest.mark.parametrize("kind", ["REDUCE_SUMSQ", "REDUCE_SUMABS", "REDUCE_MAXABS"])
def test_unit_reduce_rows_and_columns(kind):
    from clipcore import _unitwise
    rng = np.random.default_rng(12)
    arrays = [rng.standard_normal(s).astype(d) for s, d in
              [((7, 1000), np.float32), ((3000, 5), np.float64), ((1, 10), np.float32),
               ((9, 600), np.float64)]]
    by_cols = (False, True, False, True)
    gn, pn = _unitwise.unit_reduce(arrays, [2 * a for a in arrays], by_cols,
                                   getattr(_unitwise, kind), 2)
    ref = {"REDUCE_SUMSQ": lambda x, ax: np.sum(np.square(x.astype(np.float64)), axis=ax),
           "REDUCE_SUMABS": lambda x, ax: np.sum(np.abs(x.astype(np.float64)), axis=ax),
           "REDUCE_MAXABS": lambda x, ax: np.max(np.abs(x.astype(np.float64)), axis=ax)}[kind]
    expected = np.concatenate([ref(a, 0 if c else 1) for a, c in zip(arrays, by_cols)])
    factor = {"REDUCE_SUMSQ": 4.0}.get(kind, 2.0)
    np.testing.assert_allclose(gn, expected, rtol=1e-12)
    np.testing.assert_allclose(pn, factor * expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["REDUCE_SUMSQ", "REDUCE_SUMABS"])
def test_unit_reduce_twin_gives_the_generic_bits(kind):
    """A float32 row's sum on its own (the AVX-512 form, lanes combined in
    registers) has the bits of the generic loop's lanes combined in memory:
    rows of every tail length, and long ones, of tiny and huge values."""
    from clipcore import _unitwise, kernels
    if not kernels.simd_path().startswith("avx512"):
        pytest.skip("no AVX-512 form on this CPU")
    rng = np.random.default_rng(13)
    rows = [(rng.standard_normal((2, n)) * s).astype(np.float32)
            for n in list(range(1, 140)) + [1000, 4608, 8193] for s in (1e-20, 1.0, 1e20)]
    saved = kernels.get_tuning()["twins"]
    got = {}
    try:
        for twins in (True, False):
            kernels.set_tuning(twins=twins)
            got[twins] = _unitwise.unit_reduce(rows, [-3 * r for r in rows], (False,) * len(rows),
                                               getattr(_unitwise, kind), 1)
    finally:
        kernels.set_tuning(twins=saved)
    for a, b in zip(got[True], got[False]):
        np.testing.assert_array_equal(a.view(np.int64), b.view(np.int64))


@pytest.mark.parametrize("kind", ["REDUCE_SUMSQ", "REDUCE_SUMABS", "REDUCE_MAXABS"])
def test_unit_clip_matches_the_two_passes(kind):
    """The one-pass float32 rows (unit_clip) give the bits of the reductions,
    the factors and the scaling done apart, at any thread count; units below,
    above and at the bound, zero, NaN and inf among them."""
    from clipcore import _unitwise
    rng = np.random.default_rng(13)
    grads = [rng.standard_normal(s).astype(np.float32) for s in [(40, 700), (3, 5), (1, 9)]]
    params = [rng.standard_normal(g.shape).astype(np.float32) * 50 for g in grads]
    grads[0][:10] *= 1e-3                     # well below their bounds
    grads[0][10] = 0.0
    grads[0][11, 3] = np.nan
    grads[0][12, 4] = np.inf
    params[0][13] = 0.0                       # the bound from eps
    params[1][0] = np.nan
    k = getattr(_unitwise, kind)
    want = [g.copy() for g in grads]
    gn, pn = _unitwise.unit_reduce(want, params, (False,) * 3, k, 1)
    norm = np.sqrt if kind == "REDUCE_SUMSQ" else (lambda x: x)
    f = _unitwise.agc_factors(norm(gn), norm(pn), False, 0.01, 1e-3)
    counts = np.cumsum([0] + [g.shape[0] for g in grads])
    _unitwise.unit_scale(want, [f[a:b] for a, b in zip(counts, counts[1:])], (False,) * 3, 1)
    assert (f != 1).any() and (f == 1).any() and np.isnan(f).any()
    for nt in THREADS:
        got = [g.copy() for g in grads]
        _unitwise.unit_clip(got, params, k, 0.01, 1e-3, nt)
        assert [a.tobytes() for a in got] == [a.tobytes() for a in want], nt


def test_agc_factors_follow_numpy_in_each_dtype():
    from clipcore import _unitwise
    gn = np.array([0.0, 1e-9, 0.5, 2.0, 3.0, np.inf, np.nan, 1.0, 1e30])
    pn = np.array([1.0, 0.0, 60.0, 100.0, 100.0, 1.0, 1.0, np.nan, 1e-30])
    for t in (np.float32, np.float64):
        g, p = gn.astype(t), pn.astype(t)
        with np.errstate(all="ignore"):
            bound = np.maximum(p, t(1e-3)) * t(0.02)
            want = np.where(g < bound, t(1), bound / np.maximum(g, t(1e-6)))
        got = _unitwise.agc_factors(gn, pn, t is np.float64, 0.02, 1e-3)
        assert got.dtype == t and got.tobytes() == want.tobytes(), t


def test_adaptive_grad_clip_nan_and_none():
    g = np.array([[np.nan, 1.0], [1.0, 1.0]], np.float32)
    p = np.ones((2, 2), np.float32)
    clipcore.adaptive_grad_clip_([g, None], [p, None], 0.01)
    assert np.isnan(g[:, 0]).all() and np.allclose(g[:, 1], 0.01 * np.sqrt(2) / np.sqrt(2))


def _agc_bad_cases():
    g = [np.ones((3, 2), np.float32), np.ones(4, np.float32)]
    p = [np.ones((3, 2), np.float32), np.ones(4, np.float32)]
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    return [
        ([g[0]], p, ValueError, "grads has 1 arrays, params has 2"),
        ([g[0], np.ones(5, np.float32)], p, ValueError, r"grads\[1\] has shape \(5,\)"),
        ([g[0], ro], p, ValueError, r"grads\[1\]: expected a writable"),
        ([g[0], np.ones(4, np.int32)], p, TypeError, r"grads\[1\]"),
        (g, [p[0], np.ones(4, np.int64)], TypeError, r"params\[1\]"),
        (g, [p[0], None], TypeError, r"params\[1\]"),
        ([g[0], g[0][:2, :].reshape(4)], p, ValueError, r"grads\[0\] and grads\[1\] share"),
        (g, [p[0], g[1]], ValueError, r"grads\[1\] shares memory with params\[1\]"),
        ([g[0], np.ones((2, 2, 1, 1, 1, 2), np.float32)],
         [p[0], np.ones((2, 2, 1, 1, 1, 2), np.float32)], ValueError,
         r"params\[1\]: expected a parameter of 1 to 5"),
        ("g", p, TypeError, "grads must be a list"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_adaptive_grad_clip_bad_input_modifies_nothing(case):
    grads, params, exc, match = _agc_bad_cases()[case]
    arrays = [a for a in list(grads) + list(params) if isinstance(a, np.ndarray)]
    # Small params: every grad would be clipped if anything ran.
    before = _snapshot(arrays)
    with pytest.raises(exc, match=match):
        clipcore.adaptive_grad_clip_(grads, params, 1e-4)
    assert _snapshot(arrays) == before


@pytest.mark.requires_torch
@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 3.0])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adaptive_clip_grad_torch_matches_timm_formula(norm_type, dtype):
    import torch
    import clipcore.torch
    shapes = [(8, 3, 3, 3), (8,), (10, 16), (1, 5), (5, 1), ()]
    rng = np.random.default_rng(9)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s)))
                               .to(getattr(torch, dtype)))
        p.grad = torch.from_numpy(np.asarray(rng.standard_normal(s)
                                             * rng.choice([1e-3, 0.2], size=s))).to(p.dtype)
        params.append(p)
    expected = []
    for p in params:       # timm's adaptive_clip_grad, in torch ops
        pd, gd = p.detach(), p.grad.detach()
        dims = None if pd.ndim <= 1 else tuple(range(1, pd.ndim))
        if dims is None:
            pn, gn = pd.norm(norm_type), gd.norm(norm_type)
        else:
            pn, gn = pd.norm(norm_type, dim=dims, keepdim=True), gd.norm(norm_type, dim=dims,
                                                                        keepdim=True)
        max_norm = pn.clamp(min=1e-3).mul(0.05)
        expected.append(torch.where(gn < max_norm, gd, gd * (max_norm / gn.clamp(min=1e-6))))
    before = [p.grad.clone() for p in params]
    clipcore.torch.adaptive_clip_grad_(params, 0.05, norm_type=norm_type)
    assert any(not torch.equal(b, p.grad) for b, p in zip(before, params))
    tol = 1e-5 if dtype == "float32" else 1e-12
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad.numpy(), e.numpy(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.requires_torch
def test_adaptive_clip_grad_torch_fallback_and_skips():
    import torch
    import clipcore.torch
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    p.grad = torch.ones(4, 4, dtype=torch.bfloat16)
    q = torch.nn.Parameter(torch.ones(3))           # no grad: skipped
    clipcore.torch.adaptive_clip_grad_([p, q], 0.01)
    np.testing.assert_allclose(p.grad.float().numpy(), 0.01, rtol=1e-2)
    with pytest.raises(ValueError, match="norm_type"):
        clipcore.torch.adaptive_clip_grad_([p], 0.01, norm_type=0)


def _float32_agc_params(torch, shapes, seed=4):
    rng = np.random.default_rng(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), np.float32)))
        p.grad = torch.from_numpy(np.asarray(rng.standard_normal(s)
                                             * rng.choice([1e-4, 0.3], size=s), np.float32))
        params.append(p)
    return params


@pytest.mark.requires_torch
@pytest.mark.parametrize("n_threads", [1, 2, 7])
def test_adaptive_clip_grad_torch_from_memory_gives_the_checked_paths_bits(monkeypatch,
                                                                             n_threads):
    # Contiguous float32 tensors are clipped from their memory, without the
    # checked path (which must not be called), to the bits that path gives.
    import torch
    import clipcore.torch
    from clipcore import _per_example
    shapes = [(8, 3, 3, 3), (8,), (300, 70), (1, 5), (5, 1), (), (0, 3), (2, 0)]
    fast, checked = _float32_agc_params(torch, shapes), _float32_agc_params(torch, shapes)

    def refused(*args):
        raise AssertionError("the checked path ran")
    with monkeypatch.context() as m:
        m.setattr(_per_example, "adaptive_clip", refused)
        clipcore.torch.adaptive_clip_grad_(fast, 0.05, n_threads=n_threads)
    monkeypatch.setattr(clipcore.torch, "_adaptive_clip_memory", lambda *args: False)
    clipcore.torch.adaptive_clip_grad_(checked, 0.05, n_threads=n_threads)
    assert any(not torch.equal(a.grad, b.grad) for a, b in
               zip(fast, _float32_agc_params(torch, shapes)))       # something was clipped
    for a, b in zip(fast, checked):
        assert a.grad.numpy().tobytes() == b.grad.numpy().tobytes()


@pytest.mark.requires_torch
@pytest.mark.parametrize("case", ["grad on its param", "grads overlap"])
def test_adaptive_clip_grad_torch_shared_grads_raise_and_write_nothing(case):
    import torch
    import clipcore.torch
    params = _float32_agc_params(torch, [(4, 5), (4, 5), (3,)])
    with torch.no_grad():
        if case == "grad on its param":
            params[1].grad = params[1].detach()
        else:
            base = torch.rand(30)
            params[0].grad, params[1].grad = base[:20].view(4, 5), base[10:].view(4, 5)
    before = [p.grad.clone() for p in params] + [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"grads\[\d\] (shares|and grads\[\d\] share) memory"):
        clipcore.torch.adaptive_clip_grad_(params, 1e-4)
    after = [p.grad for p in params] + [p.detach() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.requires_torch
def test_adaptive_clip_grad_torch_params_may_share_memory(monkeypatch):
    # Parameters are only read: two that share memory still take the fast path.
    import torch
    import clipcore.torch
    from clipcore import _per_example
    base = torch.randn(40)
    params = [torch.nn.Parameter(base[:20].view(4, 5)), torch.nn.Parameter(base[10:30].view(4, 5))]
    for p in params:
        p.grad = torch.full((4, 5), 10.0)
    monkeypatch.setattr(_per_example, "adaptive_clip", None)        # not called
    clipcore.torch.adaptive_clip_grad_(params, 0.01)
    for p in params:
        pn = p.detach().norm(dim=1, keepdim=True).clamp(min=1e-3) * 0.01
        np.testing.assert_allclose(p.grad.norm(dim=1, keepdim=True).numpy(), pn.numpy(),
                                   rtol=1e-6)


def test_unit_clip_memory_refuses_rows_that_do_not_divide():
    from clipcore import _unitwise
    g, p = np.ones(10, np.float32), np.ones(10, np.float32)
    with pytest.raises(ValueError, match="10 values in 3 rows"):
        _unitwise.unit_clip_memory([g.ctypes.data], [p.ctypes.data], [3], [10],
                                   _unitwise.REDUCE_SUMSQ, 0.01, 1e-3, 1)
    with pytest.raises(ValueError, match="unequal"):
        _unitwise.unit_clip_memory([g.ctypes.data], [], [1], [10],
                                   _unitwise.REDUCE_SUMSQ, 0.01, 1e-3, 1)
    assert (g == 1).all()


@pytest.mark.requires_torch
def test_adaptive_clip_grad_torch_from_memory_as_the_checked_path_on_drawn_lists():
    # Drawn shapes, values (zeros, NaN, inf, tiny and huge units) and grads laid
    # in one buffer at drawn offsets, so that some share memory: the path from
    # memory raises as the checked path does, or gives its bits.
    from unittest import mock
    from hypothesis import given, strategies as st
    import torch
    import clipcore.torch
    shape = st.lists(st.integers(0, 5), max_size=4).map(tuple)
    entry = st.tuples(shape, st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e30, np.inf, np.nan]),
                      st.integers(0, 200))

    def build(entries, seed):
        rng = np.random.default_rng(seed)
        buf = torch.from_numpy(rng.standard_normal(1024).astype(np.float32))
        params = []
        for s, scale, offset in entries:
            n = int(np.prod(s))
            p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
            with torch.no_grad():
                grad = buf[offset:offset + n].view(s)
                if n:
                    grad.view(-1)[rng.integers(n)] *= np.float32(scale)
            p.grad = grad
            params.append(p)
        return params

    @given(st.lists(entry, min_size=1, max_size=6), st.integers(0, 2 ** 31),
           st.sampled_from([1e-3, 0.05, 1.0]), st.sampled_from([1, 2, 7]))
    def check(entries, seed, clip_factor, n_threads):
        results = []
        for fast in (True, False):
            params = build(entries, seed)
            with mock.patch.object(clipcore.torch, "_adaptive_clip_memory",
                                   clipcore.torch._adaptive_clip_memory if fast
                                   else (lambda *args: False)):
                before = [p.grad.numpy().tobytes() for p in params]
                try:
                    clipcore.torch.adaptive_clip_grad_(params, clip_factor, n_threads=n_threads)
                except ValueError as exc:
                    assert before == [p.grad.numpy().tobytes() for p in params]
                    results.append(str(exc))
                    continue
            results.append([p.grad.numpy().tobytes() for p in params])
        assert results[0] == results[1]
    check()
