"""The benchmark workloads: real models' shapes, exact counts, deterministic gradients."""
import numpy as np
import pytest

from clipcore import workloads
from clipcore.workloads import WORKLOADS, fill_gradients, make_gradients, n_values, shapes


@pytest.mark.parametrize("name, tensors, values", [
    ("mlp", 6, 235_146),
    ("2000x512", 2000, 1_024_000),
    ("resnet50", 161, 25_557_032),
    ("gpt2", 148, 124_439_808),
])
def test_counts_and_totals(name, tensors, values):
    assert len(WORKLOADS[name]) == tensors
    assert len(shapes(name)) == tensors
    assert n_values(name) == values
    names = [n for n, _ in WORKLOADS[name]]
    assert len(set(names)) == len(names)


def test_mlp_is_the_lessons():
    assert shapes("mlp") == [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)]


def test_resnet50_layout():
    params = dict(WORKLOADS["resnet50"])
    assert params["conv1.weight"] == (64, 3, 7, 7)
    assert params["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert params["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert params["fc.weight"] == (1000, 2048) and params["fc.bias"] == (1000,)
    convs = [s for n, s in WORKLOADS["resnet50"] if len(s) == 4]
    bn = [s for n, s in WORKLOADS["resnet50"] if n.split(".")[-2].startswith(("bn", "1"))]
    assert len(convs) == 53                      # 1 + 16 blocks x 3 + 4 projections
    assert len(bn) == 2 * 53                     # a weight and a bias per conv
    assert sum(s[0] for s in bn) == 53_120       # BatchNorm's known parameter count
    assert sum(int(np.prod(s)) for s in convs) == 23_454_912
    for n, s in WORKLOADS["resnet50"]:           # every BN follows its conv's width
        if n.endswith("bn3.weight"):
            assert s[0] == params[n.replace("bn3.weight", "conv3.weight")][0]


def test_gpt2_layout():
    params = dict(WORKLOADS["gpt2"])
    assert params["wte.weight"] == (50257, 768) and params["wpe.weight"] == (1024, 768)
    for b in range(12):
        assert params[f"h.{b}.attn.c_attn.weight"] == (768, 2304)
        assert params[f"h.{b}.mlp.c_proj.weight"] == (3072, 768)
    assert sum(1 for n in params if n.startswith("h.11.")) == 12
    assert params["ln_f.weight"] == params["ln_f.bias"] == (768,)


def test_shapes_of_a_list_and_unknown_names():
    assert shapes([[2, 3], (4,)]) == [(2, 3), (4,)]
    with pytest.raises(ValueError, match="workload must be one of mlp, 2000x512.*'resnet'"):
        shapes("resnet")
    with pytest.raises(ValueError, match="workload must be one of"):
        make_gradients("gpt3")


def test_make_gradients_is_deterministic_float32_and_separate():
    a = make_gradients("mlp", seed=3)
    b = make_gradients("mlp", seed=3)
    c = make_gradients("mlp", seed=4)
    assert [g.shape for g in a] == shapes("mlp")
    for x, y, z in zip(a, b, c):
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
        assert np.array_equal(x, y)
        assert not np.array_equal(x, z)
        assert np.all(np.isfinite(x)) and np.any(x != 0)
    for i in range(len(a)):
        for j in range(i):
            assert not np.shares_memory(a[i], a[j])


def test_tensors_differ_in_scale():
    rms = [float(np.sqrt(np.mean(g.astype(np.float64) ** 2))) for g in make_gradients("2000x512")]
    assert 1e-3 * 0.5 < min(rms) and max(rms) < 1e-1 * 2
    assert max(rms) / min(rms) > 10


def test_values_wrap_around_the_block():
    # A tensor longer than the block of drawn values is filled to its end.
    (g,) = make_gradients([(3 * workloads._BLOCK + 5,)])
    assert np.all(g != 0) and np.all(np.isfinite(g))


def test_fill_gradients_matches_make_gradients_in_one_flat_buffer():
    shp = shapes("mlp")
    flat = np.empty(n_values(shp), np.float32)
    views, pos = [], 0
    for s in shp:
        n = int(np.prod(s))
        views.append(flat[pos:pos + n].reshape(s))
        pos += n
    fill_gradients(views, seed=7)
    for v, g in zip(views, make_gradients("mlp", seed=7)):
        assert np.array_equal(v, g)


def test_fill_gradients_validates_before_writing():
    good = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"arrays\[1\]: expected a float32 ndarray, got float64"):
        fill_gradients([good, np.zeros(3)])
    with pytest.raises(TypeError, match=r"arrays\[1\]: expected a float32 ndarray, got list"):
        fill_gradients([good, [1.0]])
    with pytest.raises(ValueError, match=r"arrays\[1\]: expected a C-contiguous writable"):
        fill_gradients([good, np.zeros((4, 4), np.float32).T])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"arrays\[1\]"):
        fill_gradients([good, ro])
    assert np.all(good == 0)
