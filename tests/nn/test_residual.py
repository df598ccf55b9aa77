"""Residual blocks: finite differences through mpifc.nn.Residual and the layer table,
names, validation of nested layer tables, and the table's other layers (layernorm,
dropout, avgpool2d, globalavgpool2d, gelu/tanh/sigmoid) building and training."""
import numpy as np
import pytest

import mpifc.nn as nn
from gradcheck import check_gradients
from mpifc.comm import Grid, world
from mpifc.config import ConfigError
from mpifc.models import build_model, validate_layers

TOL = 1e-6


def _conv(c, k, stride=1, seed=0, bias=True):
    return nn.Conv2d(c, k, 3, stride=stride, padding=1, bias=bias, dtype=np.float64,
                     rng=np.random.default_rng(seed))


def block_gradcheck(block, x, label):
    params = block.parameters()
    arrays = {"x": x}
    arrays.update({f"p{i}": p.data for i, p in enumerate(params)})

    def analytic(g):
        block.zero_grad()
        block.forward(x)
        dx = block.backward(g)
        out = {f"p{i}": p.grad for i, p in enumerate(params)}
        out["x"] = dx
        return out

    return check_gradients(lambda: block.forward(x), arrays, analytic, label=label)


def test_identity_residual_gradients():
    rng = np.random.default_rng(0)
    body = nn.Sequential(_conv(3, 3, seed=1), nn.Tanh(), _conv(3, 3, seed=2))
    block = nn.Residual(body)
    x = rng.standard_normal((2, 3, 5, 5))
    y = block.forward(x)
    np.testing.assert_allclose(y, body.forward(x) + x)
    assert block_gradcheck(block, x, "identity ") < TOL


def test_projection_residual_gradients():
    rng = np.random.default_rng(1)
    # no bias before BatchNorm: it removes it, so its gradient is rounding noise
    body = nn.Sequential(_conv(2, 4, stride=2, seed=3, bias=False), nn.BatchNorm2d(4, dtype=np.float64),
                         nn.ReLU(), _conv(4, 4, seed=4))
    proj = nn.Sequential(nn.Conv2d(2, 4, 1, stride=2, bias=False, dtype=np.float64,
                                   rng=np.random.default_rng(5)),
                         nn.BatchNorm2d(4, dtype=np.float64))
    block = nn.Residual(body, proj)
    x = rng.standard_normal((3, 2, 6, 6))
    assert block.forward(x).shape == (3, 4, 3, 3)
    assert block_gradcheck(block, x, "projection ") < TOL
    names = [n for n, _ in block.named_parameters()]
    assert names == ["body.0.weight", "body.1.weight", "body.1.bias", "body.3.weight",
                     "body.3.bias", "shortcut.0.weight", "shortcut.1.weight", "shortcut.1.bias"]
    assert [n for n, _ in block.buffers()][:2] == ["body.1.running_mean", "body.1.running_var"]


def test_residual_first_layer_skips_input_gradient():
    body = nn.Sequential(nn.Linear(4, 4, dtype=np.float64, rng=np.random.default_rng(0)), nn.ReLU())
    block = nn.Residual(body, nn.Linear(4, 4, dtype=np.float64, rng=np.random.default_rng(1)))
    net = nn.Sequential(block, nn.Linear(4, 2, dtype=np.float64, rng=np.random.default_rng(2)), input_grad=False)
    x = np.random.default_rng(0).standard_normal((3, 4))
    net.forward(x)
    assert net.backward(np.ones((3, 2))) is None
    assert not block.input_grad and not body.layers[0].input_grad and not block.shortcut.input_grad
    assert np.abs(body.layers[0].weight.grad).sum() > 0


def test_residual_shape_mismatch_is_named():
    block = nn.Residual(nn.Sequential(_conv(2, 4)))
    with pytest.raises(nn.ShapeError, match="shortcut"):
        block.forward(np.zeros((1, 2, 4, 4)))


# --------------------------------------------------------------------------- #
# the layer table
# --------------------------------------------------------------------------- #
def serial_grid():
    if world().size != 1:
        pytest.skip("serial test")
    return Grid(world(), 1, 1)


RES_TABLE = {"input": [2, 6, 6], "layers": [
    {"type": "conv2d", "out": 3, "kernel": 3, "padding": 1},
    {"type": "residual", "layers": [
        {"type": "conv2d", "out": 3, "kernel": 3, "padding": 1, "shard": "out"},
        {"type": "tanh"},
        {"type": "conv2d", "out": 3, "kernel": 3, "padding": 1, "shard": "in"},
    ]},
    {"type": "residual", "layers": [
        {"type": "conv2d", "out": 4, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "sigmoid"},
    ], "projection": {"type": "conv2d", "out": 4, "kernel": 1, "stride": 2}},
    {"type": "globalavgpool2d"},
    {"type": "linear", "out": 5},
]}


def test_table_residual_names_and_gradients():
    grid = serial_grid()
    net = build_model(RES_TABLE, grid, seed=1, dtype=np.float64)
    assert net.names == ["conv1", "res1", "res2", "pool1", "fc1"]
    names = [n for n, _ in net.named_parameters()]
    assert names == ["conv1.weight", "conv1.bias", "res1.body.conv1.weight", "res1.body.conv1.bias",
                     "res1.body.conv2.weight", "res1.body.conv2.bias", "res2.body.conv1.weight",
                     "res2.body.conv1.bias", "res2.shortcut.conv1.weight",
                     "res2.shortcut.conv1.bias", "fc1.weight", "fc1.bias"]
    net.input_grad = True              # check dL/dx too
    net.layers[0].input_grad = True
    x = np.random.default_rng(2).standard_normal((2, 2, 6, 6))
    params = dict(net.named_parameters())
    arrays = {"x": x, **{n: p.data for n, p in params.items()}}

    def analytic(g):
        net.zero_grad()
        net.forward(x)
        dy = g
        for layer in reversed(net.layers):
            dy = layer.backward(dy)
        return {"x": dy, **{n: p.grad for n, p in params.items()}}

    assert check_gradients(lambda: net.forward(x), arrays, analytic, label="table ") < TOL
    # the shapes and flops the simulator and trace tests use see inside the blocks
    assert net.shapes(2)[3] == (2, 4, 3, 3)
    f, b = net.flops(2)
    assert f > 2 * 2 * 3 * 3 * 36 * 9 * 3 and b > f


def test_table_residual_seeds_differ_and_are_stable():
    grid = serial_grid()
    a = build_model(RES_TABLE, grid, seed=1, dtype=np.float64)
    b = build_model(RES_TABLE, grid, seed=1, dtype=np.float64)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(np.array_equal(pa[n].data, pb[n].data) for n in pa)
    # the two convs inside res1 (same shape) draw from different streams
    assert not np.array_equal(pa["res1.body.conv1.weight"].data, pa["res1.body.conv2.weight"].data)
    assert not np.array_equal(pa["conv1.weight"].data[:, :2], pa["res1.body.conv1.weight"].data[:, :2])


@pytest.mark.parametrize("layers, msg", [
    ([{"type": "residual"}], r"model\.layers\[0\] \(residual\): 'layers' is required"),
    ([{"type": "residual", "layers": [{"type": "conv2d", "out": 2}]}],
     r"model\.layers\[0\]\.layers\[0\] \(conv2d\): 'kernel' is required"),
    ([{"type": "relu"}, {"type": "residual", "layers": [{"type": "relu"}, {"type": "dense"}]}],
     r"model\.layers\[1\]\.layers\[1\]: unknown type 'dense'"),
    ([{"type": "residual", "layers": [{"type": "relu"}], "projection": [{"type": "linear", "out": 0}]}],
     r"model\.layers\[0\]\.projection\[0\] \(linear\): 'out' must be"),
    ([{"type": "residual", "layers": [{"type": "relu"}], "projection": 3}], r"'projection' must be"),
    ([{"type": "residual", "layers": []}], r"model\.layers\[0\]\.layers is empty"),
    ([{"type": "residual", "layers": [{"type": "relu"}], "shortcut": []}], "unknown keys"),
])
def test_nested_validation_names_the_path(layers, msg):
    with pytest.raises(ConfigError, match=msg):
        validate_layers(layers + [{"type": "linear", "out": 2}])


def test_branch_shapes_must_match():
    grid = serial_grid()
    cfg = {"input": [2, 4, 4], "layers": [
        {"type": "residual", "layers": [{"type": "conv2d", "out": 3, "kernel": 3, "padding": 1}]},
        {"type": "flatten"}, {"type": "linear", "out": 2}]}
    with pytest.raises(ConfigError, match=r"model\.layers\[0\] \(residual\): .*\(3, 4, 4\).*"
                                          r"input \(identity shortcut\) is \(2, 4, 4\).*projection"):
        build_model(cfg, grid, seed=0)
    cfg["layers"][0]["projection"] = {"type": "conv2d", "out": 3, "kernel": 1, "stride": 2}
    with pytest.raises(ConfigError, match=r"projection output is \(3, 2, 2\)"):
        build_model(cfg, grid, seed=0)


def test_config_file_with_residual_errors_name_the_key(tmp_path):
    from mpifc.config import load_config

    p = tmp_path / "m.toml"
    p.write_text('[model]\ninput = [4]\nlayers = [{type = "residual", layers = '
                 '[{type = "linear", out = 4, shard = "out"}]}, {type = "linear", out = 2}]\n')
    with pytest.raises(ConfigError, match=r"model\.layers\[0\]\.layers\[0\] \(linear\): 'shard'"):
        load_config(str(p))


def test_other_table_layers_build_and_train():
    """layernorm, dropout, avgpool2d, globalavgpool2d, gelu, tanh, sigmoid: the loss falls."""
    grid = serial_grid()
    cfg = {"input": [2, 8, 8], "layers": [
        {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
        {"type": "gelu"},
        {"type": "avgpool2d", "kernel": 2},
        {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "tanh"}]},
        {"type": "globalavgpool2d"},
        {"type": "layernorm", "eps": 1e-6},
        {"type": "linear", "out": 8},
        {"type": "sigmoid"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 3},
    ]}
    net = build_model(cfg, grid, seed=0, dtype=np.float64)
    assert [n for n, _ in net.named_parameters()][2:6] == [
        "res1.body.ln1.weight", "res1.body.ln1.bias", "ln1.weight", "ln1.bias"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 2, 8, 8))
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(int) + (x[:, 1].mean(axis=(1, 2)) > 0)
    losses = []
    for _ in range(40):
        net.zero_grad()
        losses.append(net.loss.forward(net.forward(x), y))
        net.backward(net.loss.backward(1.0))
        for p in net.parameters():
            p.data -= 0.2 * p.grad
    assert losses[-1] < 0.7 * losses[0], losses


# ---- text models (main's embeddingbag) beside residual blocks (merge of main into resnet) ----
_EMB = {"type": "embeddingbag", "vocab": 10, "dim": 4}
_RES = {"type": "residual", "layers": [{"type": "linear", "out": 4}, {"type": "relu"}]}


def test_embeddingbag_inside_a_residual_is_refused():
    """The embeddingbag is the first top-level layer only: not the first layer of a block."""
    grid = serial_grid()
    for layers, msg in [
        ([{"type": "residual", "layers": [_EMB]}, {"type": "linear", "out": 3}],
         r"model\.layers\[0\]\.layers\[0\] \(embeddingbag\) must be the first layer of "
         r"model\.layers, not inside a residual"),
        ([_EMB, {"type": "residual", "layers": [{"type": "relu"}], "projection": [_EMB]},
          {"type": "linear", "out": 3}],
         r"model\.layers\[1\]\.projection\[0\] \(embeddingbag\) must be the first layer of "
         r"model\.layers"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            validate_layers(layers)
        with pytest.raises(ConfigError, match=msg):
            build_model({"input": ["tokens"], "layers": layers}, grid, seed=0)


def test_text_model_with_a_residual_block_builds_and_is_described():
    """embeddingbag -> residual(linear, relu) -> linear: built (names, shapes, forward on
    (tokens, offsets)), gradients reach the table, and the simulator describes it."""
    from mpifc.config import load_config
    from mpifc.sim.workload import describe_step

    grid = serial_grid()
    model = {"input": ["tokens", 5], "layers": [_EMB, _RES, {"type": "linear", "out": 3}]}
    net = build_model(model, grid, seed=0, dtype=np.float64)
    assert net.text and net.names == ["emb1", "res1", "fc1"]
    assert [n for n, _ in net.named_parameters()] == [
        "emb1.weight", "res1.body.fc1.weight", "res1.body.fc1.bias", "fc1.weight", "fc1.bias"]
    assert net.shapes(2) == [(2, 5), (2, 4), (2, 4), (2, 3)]
    y = net.forward((np.array([1, 3, 2, 7]), np.array([0, 3])))
    assert y.shape == (2, 3)
    net.zero_grad()
    net.backward(np.ones_like(y))
    emb_grad = dict(net.named_parameters())["emb1.weight"].grad
    assert np.abs(emb_grad[[1, 2, 3, 7]]).sum() > 0 and not emb_grad[[0, 4, 5, 6, 8, 9]].any()

    cfg = load_config("digits-mlp")
    cfg["model"] = model
    d = describe_step(cfg, 1, 1, global_batch=8)
    assert d.params == 10 * 4 + (4 * 4 + 4) + (4 * 3 + 3)
