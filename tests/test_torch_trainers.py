"""clipcore.torch.patch() under trainers (Lightning, Accelerate) and clipcore under torch.compile."""
import ast
import collections
import importlib.util
import logging
import types
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.nn.utils.clip_grad  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import clipcore.torch as ct  # noqa: E402

utils = torch.nn.utils
clip_grad = torch.nn.utils.clip_grad
NAMES = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]
TORCH = {name: getattr(utils, name) for name in NAMES}   # torch's own, before any patch
PATCHED = [(utils, n) for n in NAMES] + [(clip_grad, "clip_grad_norm_"),
                                         (clip_grad, "clip_grad_value_")]


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with torch's functions in place."""
    ct.unpatch()
    assert all(getattr(m, n) is TORCH[n] for m, n in PATCHED)
    yield
    ct.unpatch()
    assert all(getattr(m, n) is TORCH[n] for m, n in PATCHED)


@pytest.fixture
def calls(monkeypatch):
    """Count calls that enter clipcore.torch's tensor check (every public function
    makes exactly one, fast path or not) and calls handed to torch's own functions."""
    counter = collections.Counter()
    memory = ct._memory

    def counted_memory(tensors, writable):
        counter["clipcore"] += 1
        return memory(tensors, writable)

    def spy(name):
        real = TORCH[name]

        def f(*args, **kwargs):
            counter["torch"] += 1
            return real(*args, **kwargs)
        return f
    monkeypatch.setattr(ct, "_memory", counted_memory)
    monkeypatch.setattr(ct, "_torch", types.SimpleNamespace(**{n: spy(n) for n in NAMES}))
    return counter


def is_patched():
    return all(getattr(m, n) is getattr(ct, n) for m, n in PATCHED)


def params_with_grads(dtype=torch.float32, seed=0, shapes=((7, 5), (5,), (3, 7))):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        params.append(p)
    return params


def grads(params):
    return [p.grad.clone() for p in params]


# --- patch(), unpatch(), nesting ------------------------------------------------------------

def test_patch_and_unpatch_are_idempotent():
    assert not is_patched()
    ct.patch()
    assert is_patched()
    ct.patch()
    assert is_patched()
    ct.unpatch()
    assert not is_patched()
    ct.unpatch()
    assert not is_patched()
    # the private helpers torch's own clip_grad_norm_ calls stay torch's
    with ct.patch():
        assert clip_grad._get_total_norm is TORCH["get_total_norm"]
        assert clip_grad._clip_grads_with_norm_ is TORCH["clip_grads_with_norm_"]


def test_context_manager_restores_the_state_it_found():
    with ct.patch() as p:
        assert is_patched()
        with ct.patch():          # nested: its exit leaves the outer block patched
            assert is_patched()
        assert is_patched()
        assert "patched" in repr(p)
    assert not is_patched()

    ct.patch()                    # an earlier plain patch() outlives a later with block
    with ct.patch():
        assert is_patched()
    assert is_patched()
    ct.unpatch()
    assert not is_patched()


def test_context_manager_unpatches_on_error_and_after_explicit_unpatch():
    with pytest.raises(ZeroDivisionError):
        with ct.patch():
            1 / 0
    assert not is_patched()
    with ct.patch():
        ct.unpatch()
        assert not is_patched()
    assert not is_patched()


def test_unpatch_leaves_a_later_replacement_alone():
    ct.patch()
    other = object()
    utils.clip_grad_value_ = other       # someone patching over clipcore
    try:
        ct.unpatch()
        assert utils.clip_grad_value_ is other
        assert utils.clip_grad_norm_ is TORCH["clip_grad_norm_"]
    finally:
        utils.clip_grad_value_ = TORCH["clip_grad_value_"]


# --- calls through torch.nn.utils reach clipcore ------------------------------------------

CALLS = {
    "utils.clip_grad_norm_": lambda ps: utils.clip_grad_norm_(ps, 0.5),
    "clip_grad.clip_grad_norm_": lambda ps: clip_grad.clip_grad_norm_(ps, 0.5),
    "utils.clip_grad_value_": lambda ps: utils.clip_grad_value_(ps, 0.5),
    "clip_grad.clip_grad_value_": lambda ps: clip_grad.clip_grad_value_(ps, 0.5),
    "utils.get_total_norm": lambda ps: utils.get_total_norm([p.grad for p in ps], 3.0),
    "utils.clip_grads_with_norm_": lambda ps: utils.clip_grads_with_norm_(ps, 0.5,
                                                                           torch.tensor(4.0)),
}


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_calls_through_both_module_paths_reach_clipcore(call, calls):
    ps, ref = params_with_grads(), params_with_grads()
    expected = CALLS[call](ref)          # unpatched: torch itself, clipcore never entered
    assert calls == {}
    with ct.patch():
        got = CALLS[call](ps)
    assert calls == {"clipcore": 1}      # clipcore's fast path, no fallback
    if expected is None:
        assert got is None
    else:
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)
    for a, b in zip(grads(ps), grads(ref)):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0)


def test_deprecated_clip_grad_norm_reaches_clipcore_through_clip_grad(calls):
    with ct.patch():
        for fn in (utils.clip_grad_norm, clip_grad.clip_grad_norm):   # one function
            with pytest.warns(FutureWarning):
                fn(params_with_grads(), 0.5)
    assert calls == {"clipcore": 2}


def grad_requiring_grad():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0], requires_grad=True)
    return [p]


FALLBACKS = {   # (gradients, norm_type) that clipcore hands to torch (no CUDA needed), and
    # the counts of clipcore_norm_, clip_grad_norm, get_total_norm: clipcore's tensor check
    # is skipped for norm_type 0, and get_total_norm reads a grad requiring grad itself
    # (float16 and bfloat16 gradients take clipcore's path now: tests/test_half.py)
    "grad requires grad": (grad_requiring_grad, 2.0, {"clipcore": 3, "torch": 2}),
    "norm_type 0": (params_with_grads, 0.0, {"torch": 3}),
}


@pytest.mark.parametrize("case", FALLBACKS, ids=str)
def test_fallback_while_patched_reaches_torch_without_recursion(case, calls):
    make, norm_type, counts = FALLBACKS[case]
    ps, ref = make(), make()
    with ct.patch():
        got = utils.clip_grad_norm_(ps, 0.5, norm_type)
        with pytest.warns(FutureWarning):
            clip_grad.clip_grad_norm(make(), 0.5, norm_type)
        total = utils.get_total_norm([p.grad for p in make()], norm_type)
    assert calls == counts
    expected = TORCH["clip_grad_norm_"](ref, 0.5, norm_type)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(total, expected)
    for a, b in zip(grads(ps), grads(ref)):
        assert torch.equal(a, b)
    if case != "norm_type 0":
        ps, ref = make(), make()
        with ct.patch():
            utils.clip_grad_value_(ps, 0.5)
        TORCH["clip_grad_value_"](ref, 0.5)
        assert calls["torch"] == counts["torch"] + 1
        for a, b in zip(grads(ps), grads(ref)):
            assert torch.equal(a, b)


# --- the trainers' call sites -------------------------------------------------------------

def attribute_calls(module_name):
    """The names of torch.nn.utils a module's source looks up when it runs (its
    torch.nn.utils.<name> attributes, and names a function imports from it), and
    the names its top level imports from it (which patch() could not reach)."""
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    at_call, at_import = set(), set()
    in_functions = {id(node) for f in ast.walk(tree)
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.nn.utils":
            at_call.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.nn.utils"):
            names = {a.name for a in node.names}
            late = id(node) in in_functions and node.module == "torch.nn.utils"
            (at_call if late else at_import).update(names)
    return at_call, at_import


@pytest.mark.parametrize("module, expected", [
    pytest.param("lightning.pytorch.plugins.precision.precision",
                 {"clip_grad_norm_", "clip_grad_value_"}, marks=pytest.mark.requires_lightning),
    pytest.param("lightning.fabric.strategies.strategy",
                 {"clip_grad_norm_", "clip_grad_value_"}, marks=pytest.mark.requires_lightning),
    pytest.param("accelerate.accelerator", set(NAMES), marks=pytest.mark.requires_accelerate),
])
def test_trainers_look_the_functions_up_at_call_time(module, expected):
    at_call, at_import = attribute_calls(module)
    assert at_call & set(NAMES) == expected
    assert not at_import & set(NAMES + ["clip_grad_norm"])


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def tiny_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    y = torch.randn(64, 1, generator=gen) * 3      # norms of 2-5: clipping at 0.5 scales
    return torch.utils.data.TensorDataset(x, y)


def lightning_fit(algorithm):
    """Five SGD steps under Trainer(gradient_clip_val=0.5); the model and, per step,
    the gradients before and after clipping."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()
            self.before, self.after = [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):    # Lightning clips after this
            self.before.append(grads(self.parameters()))

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            opt.register_step_post_hook(lambda *_: self.after.append(grads(self.parameters())))
            return opt

    model = Tiny()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=0.5,
                         gradient_clip_algorithm=algorithm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # Lightning's advice on num_workers and the like
        trainer.fit(model, torch.utils.data.DataLoader(tiny_data(), batch_size=16))
    assert len(model.after) == 5
    return model


@pytest.fixture
def quiet_lightning():
    logger = logging.getLogger("lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def ulps(a, b):
    """Distance in float32 ulps, elementwise (same-sign values)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.requires_lightning
def test_lightning_gradient_clip_by_value_same_weights(calls, quiet_lightning):
    theirs = lightning_fit("value")
    assert calls == {}                    # unpatched: clipcore never entered
    with ct.patch():
        ours = lightning_fit("value")
    assert calls == {"clipcore": 5}       # one clip_grad_value_ per step, none handed to torch
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)          # the clamp is exact: bit for bit


@pytest.mark.requires_lightning
def test_lightning_gradient_clip_by_norm(calls, quiet_lightning):
    theirs = lightning_fit("norm")
    assert calls == {}
    with ct.patch():
        ours = lightning_fit("norm")
    assert calls == {"clipcore": 5}
    # Bit for bit while the two norms agree. They differ where torch's float32
    # accumulation lands an ulp off the float32 nearest the exact norm, which
    # clipcore's float64 accumulation returns; from then on the runs drift by ulps.
    same_so_far = True
    for step, (before, after_ours, after_theirs) in enumerate(
            zip(ours.before, ours.after, theirs.after)):
        n_ours, n_torch = ct.get_total_norm(before), TORCH["get_total_norm"](before)
        exact = torch.linalg.vector_norm(torch.cat([g.double().ravel() for g in before]))
        assert n_ours.item() > 0.5                                     # clipped
        assert n_ours == exact.float()                                 # correctly rounded
        assert ulps(n_ours, n_torch).item() <= 1
        same_so_far &= all(torch.equal(a, b) for a, b in zip(before, theirs.before[step]))
        same_so_far &= bool(n_ours == n_torch)
        if same_so_far:
            assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs)), step
    assert all(torch.equal(a, b) for a, b in zip(ours.after[0], theirs.after[0]))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.requires_accelerate
def test_accelerate_clip_grad_norm_(calls):
    from accelerate import Accelerator

    def run():
        accelerator = Accelerator(cpu=True)
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(tiny_data(), batch_size=16)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        norms = []
        batches = [batch for _ in range(2) for batch in loader]     # 2 epochs of 4 batches
        for x, y in batches[:5]:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            before = grads(model.parameters())
            norms.append((accelerator.clip_grad_norm_(model.parameters(), 0.5),
                          TORCH["get_total_norm"](before)))
            opt.step()
        return model, norms

    theirs, theirs_norms = run()
    assert calls == {}
    with ct.patch():
        ours, ours_norms = run()
    # A step calls clip_grad_norm_, or get_total_norm and clip_grads_with_norm_
    # (newer accelerate, whose clip_grad_norm_ handles DTensors).
    assert set(calls) == {"clipcore"} and calls["clipcore"] in (5, 2 * 5)
    for (ours_returned, ours_torch), (theirs_returned, _) in zip(ours_norms, theirs_norms):
        assert theirs_returned.dtype == ours_returned.dtype == torch.float32
        assert ulps(ours_returned, ours_torch).item() <= 1   # see the Lightning test
    assert torch.equal(ours_norms[0][0], theirs_norms[0][0])
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- torch.compile ------------------------------------------------------------------------

def compiled_norm(ps):
    return ct.clip_grad_norm_(ps, 0.5)


def compiled_value(ps):
    ct.clip_grad_value_(ps, 0.3)
    return ps[0].grad * 2


def compiled_total_then_scale(ps):
    total = ct.get_total_norm([p.grad for p in ps], 3.0)
    ct.clip_grads_with_norm_(ps, 0.5, total)
    return total


def compiled_through_torch(ps):         # patched, with a generator of parameters
    return torch.nn.utils.clip_grad_norm_((p for p in ps), 0.5)


COMPILED = {
    compiled_norm: ["clip_grad_norm_"],
    compiled_value: ["clip_grad_value_"],
    compiled_total_then_scale: ["get_total_norm", "clip_grads_with_norm_"],
}


def ops_in(graph_module):
    return [str(n.target).split(".")[1] for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("clipcore.")]


@pytest.mark.parametrize("fn", COMPILED, ids=lambda f: f.__name__)
def test_compile_fullgraph_matches_eager(fn):
    torch._dynamo.reset()
    eager_ps, compiled_ps = params_with_grads(), params_with_grads()
    expected = fn(eager_ps)
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(fn, fullgraph=True, backend=counter)(compiled_ps)
    assert counter.frame_count == 1 and ops_in(counter.graphs[0]) == COMPILED[fn]
    assert torch.equal(got, expected)
    for a, b in zip(grads(compiled_ps), grads(eager_ps)):
        assert torch.equal(a, b)


def test_compile_default_backend_through_patched_torch_and_fallback_dtypes():
    torch._dynamo.reset()
    for bf16 in (False, True):           # a bfloat16 grad in a float32 list: a mixed list

        def make():
            ps = params_with_grads()
            if bf16:
                ps[1:2] = params_with_grads(torch.bfloat16, shapes=[(4,)])
            return ps
        ps, ref = make(), make()
        expected = ct.clip_grad_norm_(ref, 0.5)                           # eager
        if bf16:   # torch rounds the bfloat16 tensor's own norm to bfloat16 first: 2^-8
            assert torch.allclose(expected, TORCH["clip_grad_norm_"](make(), 0.5), rtol=4e-3)
        with ct.patch():
            got = torch.compile(compiled_through_torch, fullgraph=True)(ps)   # inductor
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
        for a, b in zip(grads(ps), grads(ref)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float32, torch.float64],
                                    [torch.bfloat16, torch.float16], []], ids=str)
def test_custom_ops_pass_opcheck(dtypes):
    ts = [torch.randn(5, 3, dtype=d) for d in dtypes]
    total = torch.tensor(7.0)
    ops = torch.ops.clipcore
    torch.library.opcheck(ops.get_total_norm, ([t.clone() for t in ts], 2.0, False, None))
    torch.library.opcheck(ops.clip_grad_norm_, ([t.clone() for t in ts], 0.5, 2.0, False, None))
    torch.library.opcheck(ops.clip_grads_with_norm_, ([t.clone() for t in ts], 0.5, total, None))
    torch.library.opcheck(ops.clip_grad_value_, ([t.clone() for t in ts], 0.1, None))
