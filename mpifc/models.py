"""Models from a config's ``[model]`` table, on any dp x tp grid.

    net = build_model(cfg["model"], grid, seed=0, dtype=np.float32)
    logits = net.forward(x)                       # x : (N_local, *input)
    loss = net.loss.forward(logits, y)            # python float, mean over local rows
    dp = DataParallel(net, grid.dp_comm)          # replicas over dp, buckets, overlap
    dp.backward(net.loss.backward(scale)); dp.synchronize(); opt.step()

Layer table entries (``[model] layers = [{type = ..., ...}, ...]``):

    linear       out, bias=true, init, shard = "column" | "row" | "none"
    conv2d       out, kernel, stride=1, padding=0, dilation=1, bias=true, init,
                 shard = "out" | "in" | "none"
    batchnorm2d / batchnorm1d   eps=1e-5, momentum=0.1
    relu, gelu, tanh, sigmoid, leakyrelu (slope=0.01)
    maxpool2d / avgpool2d       kernel, stride=kernel, padding=0
    globalavgpool2d, flatten, dropout (p=0.5)
    layernorm    eps=1e-5 (over the whole per-sample shape; needs a whole activation)
    residual     layers = [...], projection = {...} or [...] (optional; default identity):
                 y = layers(x) + projection(x), a :class:`mpifc.nn.Residual` whose
                 children ``body`` / ``shortcut`` are built (and named, and seeded from
                 ``[seed, i, 0 | 1, j]``) like the top-level table
    embeddingbag vocab, dim, mode = "mean" | "sum", padding_idx, shard = "vocab" | "none"
                 (text models only: the first layer, with ``input = ["tokens"]``)

Text models: ``input = ["tokens"]`` (or ``["tokens", L]``, L the mean tokens per
document, used only to count the embedding's flops in :meth:`Net.flops` and the
simulator; default 64) and an ``embeddingbag`` first layer. The batch ``x`` is then
the pair ``(tokens, offsets)`` of int64 arrays: tokens (T,) the token ids of this
rank's documents back to back, offsets (N,) where each document starts (offsets[0]
== 0, the last one runs to T, empty documents allowed); the layer returns (N, dim).
Tokens equal to ``padding_idx`` (the datasets' pad id is 0) are dropped: they add
nothing and do not count in the mean. ``shard = "vocab"`` on tp > 1 splits the
table's rows over the tensor group (:class:`~mpifc.parallel.embedding.VocabParallelEmbeddingBag`:
one allreduce of the (N, dim) bag sums in forward, no message in backward).

On tp = 1 every layer is the serial one of :mod:`mpifc.nn` (no tensor messages).
On tp > 1 ``shard`` picks the tensor-parallel layer; the activation between
layers is either replicated over the tensor group or split on its channel/feature
axis. A column linear or output-channel conv keeps its output split when the next
layer with parameters takes split input (a row linear, an input-channel conv) or
when it is the last layer (class-split logits for the class-parallel loss), and
gathers it otherwise. Layers without a ``shard`` run replicated. A residual block's
input is whole (a producer before it gathers), and so are its branches' outputs (a
producer last in a branch gathers), so the block adds whole tensors; the
activation is split only between an out/in (column/row) pair inside a branch. BatchNorm on
split channels normalises its own channels (its parameters and running stats are
split like them). With dp > 1 BatchNorm becomes SyncBatchNorm over the data group,
so dp ranks normalise with the statistics of the whole global batch.

Initialisation: layer ``i`` of the table draws from ``numpy.random.default_rng([seed, i])``
(on the tensor root for a sharded weight, which is scattered), so every layout of
the same config starts from the same global tensors. Dropout draws its masks from
``[seed, i, dp_rank]``: replicated over the tensor group, different over dp.

Names: children ``conv1, bn1, relu1, pool1, flatten1, fc1, fc2, ...`` (numbered per
kind); parameters ``fc1.weight`` etc. (checkpoint keys, the same on every layout);
sharded layers use the child name as their trace phase prefix (``fc1.backward``).
"""
from __future__ import annotations

import math

import numpy as np

from mpifc import nn
from mpifc.config import ConfigError
from mpifc.nn import functional as F
from mpifc.nn import fuse
from mpifc.nn.init import _BY_NAME as INITS
from mpifc.nn.module import Module
from mpifc.parallel import describe as D
from mpifc.parallel.data import backward_layers
from mpifc.parallel.init import shard_counts

# type -> (child name prefix, allowed keys besides "type")
LAYERS = {
    "linear": ("fc", {"out", "bias", "init", "shard"}),
    "conv2d": ("conv", {"out", "kernel", "stride", "padding", "dilation", "bias", "init", "shard"}),
    "batchnorm2d": ("bn", {"eps", "momentum"}),
    "batchnorm1d": ("bn", {"eps", "momentum"}),
    "relu": ("relu", set()),
    "gelu": ("gelu", set()),
    "tanh": ("tanh", set()),
    "sigmoid": ("sigmoid", set()),
    "leakyrelu": ("relu", {"slope"}),
    "maxpool2d": ("pool", {"kernel", "stride", "padding"}),
    "avgpool2d": ("pool", {"kernel", "stride", "padding"}),
    "globalavgpool2d": ("pool", set()),
    "flatten": ("flatten", set()),
    "dropout": ("dropout", {"p"}),
    # --- residual networks (issue 18) ---
    "layernorm": ("ln", {"eps"}),
    "residual": ("res", {"layers", "projection"}),
    "embeddingbag": ("emb", {"vocab", "dim", "mode", "padding_idx", "shard"}),
}
SHARDS = {"linear": ("column", "row", "none"), "conv2d": ("out", "in", "none"),
          "embeddingbag": ("vocab", "none")}
TEXT_INPUT = "tokens"           # model.input = ["tokens"] (or ["tokens", L]): a text model
TOKENS_PER_DOC = 64             # L when not given (flops of the embedding only)
_PRODUCERS = {("linear", "column"), ("conv2d", "out")}     # output split over tp
_CONSUMERS = {("linear", "row"), ("conv2d", "in")}         # take split input


class Flatten(nn.Flatten):
    """:class:`mpifc.nn.Flatten` that also takes an empty batch (a dp rank with no rows
    in an uneven last batch): the flattened size is computed, not inferred with -1."""

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(self.output_shape(x.shape))

    def output_shape(self, input_shape):
        s = self.start_dim
        return tuple(input_shape[:s]) + (math.prod(input_shape[s:]),)

    def collectives(self, input_shape):
        return []

    def flops(self, input_shape):
        return 0, 0


# --------------------------------------------------------------------------- #
# losses with the trainer's interface
# --------------------------------------------------------------------------- #
def _host_float(loss):
    """The loss as a float on the host; on a device the 0-d array itself (reading it
    back is a scalar read: the trainer reads its losses once per log line)."""
    from mpifc.backend import is_device_array

    return loss if is_device_array(loss) else float(loss)


class LocalLoss:
    """Softmax cross-entropy on whole logits (N, Q), replicated over the tensor group.

    No messages: every tensor rank holds the same logits and computes the same loss.
    ``num_classes`` None: Q is not checked; ``ce``: the :class:`mpifc.nn.SoftmaxCrossEntropy`
    to use (:func:`mpifc.fit` wraps a user's loss so, e.g. one with label smoothing).
    """

    def __init__(self, num_classes, ce=None):
        self.num_classes = None if num_classes is None else int(num_classes)
        self._ce = nn.SoftmaxCrossEntropy() if ce is None else ce
        self._logits = self._target = None

    def forward(self, logits, target) -> float:
        """logits : (N, Q), target : (N,) -> mean loss over the N local rows (0.0 if N = 0);
        a float on the host, a 0-d array on a device (read back by the caller)."""
        if logits.ndim != 2 or (self.num_classes is not None
                                and logits.shape[1] != self.num_classes):
            raise ValueError(f"loss: expects logits (N, {self.num_classes or 'Q'}), got {logits.shape}")
        self._logits, self._target = logits, target
        if logits.shape[0] == 0:
            return 0.0
        return _host_float(self._ce.forward(logits, target))

    def backward(self, scale=1.0):
        """-> dlogits (N, Q) of ``scale * loss``."""
        if self._logits.shape[0] == 0:
            return self._logits * 0
        return self._ce.backward(scale)

    def correct(self) -> int:
        return int(self.correct_array())

    def correct_array(self):
        """Rows right as a 0-d array where the logits live (no host read)."""
        if self._logits.shape[0] == 0:
            return 0
        return (self._logits.argmax(axis=1) == self._target).sum()

    def collectives(self, logits_shape, accuracy=False):
        return []


class ClassParallelLoss:
    """Softmax cross-entropy on class-split logits (N, Q_r): wraps
    :class:`~mpifc.parallel.ParallelSoftmaxCrossEntropy` (allreduces over the tensor group)."""

    def __init__(self, num_classes, group, dtype):
        from mpifc.parallel.loss import ParallelSoftmaxCrossEntropy

        self.num_classes = int(num_classes)
        self.inner = ParallelSoftmaxCrossEntropy(num_classes, group, dtype=dtype)

    def forward(self, logits, target) -> float:
        return _host_float(self.inner.forward(logits, target))

    def backward(self, scale=1.0):
        return self.inner.backward(scale)

    def correct(self) -> int:
        return int(self.inner.correct())

    def correct_array(self):
        """Rows right as a 0-d array where the logits live (no host read)."""
        return self.inner.correct_array()

    def collectives(self, logits_shape, accuracy=False):
        return self.inner.collectives(logits_shape, accuracy=accuracy)


# --------------------------------------------------------------------------- #
# the model
# --------------------------------------------------------------------------- #
class Net(Module):
    """The layers of a config on a grid; see the module docstring.

    Attributes
    ----------
    layers : list of Module, in order (children named ``names[i]``)
    names : child names, e.g. ["conv1", "bn1", "relu1", ...]
    grid : the Grid it was built on
    loss : :class:`LocalLoss` or :class:`ClassParallelLoss` for the logits it returns
    input_shape : per-sample input shape, e.g. (1, 8, 8) or (64,); ("tokens",) or
        ("tokens", L) for a text model (its x is the pair (tokens, offsets))
    text : True for a text model
    num_classes : Q, the last linear layer's ``out``
    logits_sharded : True when the logits are split over classes (tp > 1)
    """

    def __init__(self, layers, names, grid, loss, input_shape, num_classes, logits_sharded):
        super().__init__()
        for name, layer in zip(names, layers):
            self.add_module(name, layer)
        self.layers, self.names = list(layers), list(names)
        self.grid, self.loss = grid, loss
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.text = bool(self.input_shape) and self.input_shape[0] == TEXT_INPUT
        self.logits_sharded = bool(logits_sharded)
        # the input is data: the first layer with parameters skips its input gradient
        self.input_grad = False
        first = next((l for l in self.layers if l.parameters()), None)
        if first is not None:
            first.input_grad = False

    def forward(self, x):
        """x : (N, *input_shape) -> local logits (N, Q) or (N, Q_r) when class-split.
        A text model takes x = (tokens (T,), offsets (N,)), 1-d integer arrays."""
        if self.text:
            if not (isinstance(x, tuple) and len(x) == 2 and all(
                    getattr(a, "ndim", None) == 1 and a.dtype.kind in "iu" for a in x)):
                got = (tuple((getattr(a, "shape", "?"), str(getattr(a, "dtype", "?"))) for a in x)
                       if isinstance(x, tuple) else f"{type(x).__name__} {getattr(x, 'shape', '')}")
                raise ValueError(f"text model expects x = (tokens (T,), offsets (N,)) integer "
                                 f"arrays, got {got}")
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model expects input (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return fuse.forward(self.layers, x)          # BatchNorm + ReLU pairs in one pass

    def backward(self, dlogits) -> None:
        """Backward through the layers in reverse (down to the first layer with parameters)."""
        fuse.backward(backward_layers(self), dlogits)

    # --- description ---
    def shapes(self, rows: int) -> list[tuple]:
        """Local input shape of every layer, then the logits shape, for ``rows`` samples."""
        if self.text:       # (N, L): N documents of L tokens on average (flops only)
            L = int(self.input_shape[1]) if len(self.input_shape) > 1 else TOKENS_PER_DOC
            shape = (int(rows), L)
        else:
            shape = (int(rows),) + self.input_shape
        out = [shape]
        for layer in self.layers:
            shape = D.output_shape(layer, shape)
            out.append(shape)
        return out

    def collectives(self, rows: int, loss=True, accuracy=False) -> list:
        """Messages of one training step (forward + backward, and the loss) on this rank."""
        shapes = self.shapes(rows)
        out = []
        for layer, shape in zip(self.layers, shapes):
            out += D.collectives(layer, shape)
        if loss:
            out += self.loss.collectives(shapes[-1], accuracy=accuracy)
        return out

    def flops(self, rows: int) -> tuple[int, int]:
        """(forward, backward) flops of this rank's layers for ``rows`` samples."""
        f = b = 0
        for layer, shape in zip(self.layers, self.shapes(rows)):
            lf, lb = D.flops(layer, shape)
            f, b = f + lf, b + lb
        return f, b

    def __repr__(self):
        inner = "\n".join(f"  ({n}): {l!r}" for n, l in zip(self.names, self.layers))
        return (f"Net(input={self.input_shape}, classes={self.num_classes}, dp={self.grid.dp}, "
                f"tp={self.grid.tp}\n{inner}\n)")


# --------------------------------------------------------------------------- #
# building
# --------------------------------------------------------------------------- #
def _is_int(v, lo) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo


def _is_num(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v))


def _int_or_pair(lo):
    return lambda v: _is_int(v, lo) or (isinstance(v, (list, tuple)) and len(v) == 2
                                        and all(_is_int(x, lo) for x in v))


# key -> (what it must be, check); the keys each type takes are in LAYERS
LAYER_KEYS = {
    "out": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "kernel": ("an integer >= 1 or a list of 2", _int_or_pair(1)),
    "stride": ("an integer >= 1 or a list of 2", _int_or_pair(1)),
    "dilation": ("an integer >= 1 or a list of 2", _int_or_pair(1)),
    "padding": ("an integer >= 0, a list of 2, or [[top, bottom], [left, right]]",
                lambda v: _int_or_pair(0)(v) or (isinstance(v, (list, tuple)) and len(v) == 2
                                                 and all(isinstance(x, (list, tuple))
                                                         and _int_or_pair(0)(x) for x in v))),
    "bias": ("true or false", lambda v: isinstance(v, bool)),
    "init": (f"one of {', '.join(INITS)}", lambda v: isinstance(v, str) and v in INITS),
    "eps": ("a number > 0", lambda v: _is_num(v) and v > 0),
    "momentum": ("a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1),
    "slope": ("a number", _is_num),
    "p": ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1),
    "vocab": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "dim": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "mode": ("one of mean, sum", lambda v: v in ("mean", "sum")),
    "padding_idx": ("an integer >= 0", lambda v: _is_int(v, 0)),
}
_REQUIRED = {"linear": ("out",), "conv2d": ("out", "kernel"), "maxpool2d": ("kernel",),
             "avgpool2d": ("kernel",), "residual": ("layers",),
             "embeddingbag": ("vocab", "dim")}


def _projection_list(p):
    """A residual's ``projection``: one layer table or a list of them -> list."""
    return [p] if isinstance(p, dict) else p


def validate_layers(specs, path: str = "model.layers", *, top: bool = True) -> None:
    """Check a ``[model] layers`` value: raise ConfigError naming ``model.layers[i]``.

    Called by :func:`mpifc.config.validate` at load and by :func:`build_model`.
    A residual's ``layers`` and ``projection`` are checked the same way, named by
    their path (``model.layers[3].layers[1]``, ``model.layers[3].projection[0]``).
    Shapes are checked when the model is built (they need the input and the grid).
    """
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"{path} must be a list of tables, got {type(specs).__name__}")
    if not specs:
        raise ConfigError(f"{path} is empty")
    for i, s in enumerate(specs):
        if not isinstance(s, dict) or "type" not in s:
            raise ConfigError(f"{path}[{i}] must be a table with a 'type' "
                              f"({{type = \"linear\", ...}}), got {s!r}")
        t = s["type"]
        if not isinstance(t, str) or t not in LAYERS:
            raise ConfigError(f"{path}[{i}]: unknown type {t!r}; known: "
                              f"{', '.join(sorted(LAYERS))}")
        extra = set(s) - {"type"} - LAYERS[t][1]
        if extra:
            raise ConfigError(f"{path}[{i}] ({t}): unknown keys {sorted(extra)}; "
                              f"allowed: {sorted(LAYERS[t][1])}")
        for k in _REQUIRED.get(t, ()):
            if k not in s:
                raise ConfigError(f"{path}[{i}] ({t}): '{k}' is required")
        for k, v in s.items():
            want, ok = (f"one of {', '.join(SHARDS[t])}", lambda v: v in SHARDS[t]) \
                if k == "shard" else LAYER_KEYS.get(k, (None, None))
            if ok is not None and not ok(v):
                raise ConfigError(f"{path}[{i}] ({t}): '{k}' must be {want}, got {v!r}")
        if t == "embeddingbag" and (i != 0 or not top):
            raise ConfigError(f"{path}[{i}] (embeddingbag) must be the first layer"
                              + ("" if top else " of model.layers, not inside a residual")
                              + " (it takes the (tokens, offsets) of a text batch)")
        if t == "embeddingbag" and s.get("padding_idx", 0) >= s["vocab"]:
            raise ConfigError(f"{path}[{i}] (embeddingbag): 'padding_idx' must be < vocab "
                              f"= {s['vocab']}, got {s['padding_idx']}")
        if t == "residual":
            validate_layers(s["layers"], f"{path}[{i}].layers", top=False)
            if "projection" in s:
                p = s["projection"]
                if not isinstance(p, (dict, list, tuple)):
                    raise ConfigError(f"{path}[{i}] (residual): 'projection' must be a layer "
                                      f"table or a list of them, got {p!r}")
                validate_layers(_projection_list(p), f"{path}[{i}].projection", top=False)
    if not top:
        return                       # a residual branch: no classifier rule inside
    lin = [i for i, s in enumerate(specs) if s["type"] in ("linear", "conv2d")]
    if not lin or specs[lin[-1]]["type"] != "linear":
        raise ConfigError("model.layers: the last layer with parameters must be a linear layer "
                          "(its 'out' is the number of classes)")


def is_text_input(input_shape) -> bool:
    """``model.input`` of a text model: ["tokens"] or ["tokens", L] (L >= 1)."""
    return (isinstance(input_shape, (list, tuple)) and 1 <= len(input_shape) <= 2
            and input_shape[0] == TEXT_INPUT
            and all(_is_int(v, 1) for v in input_shape[1:]))


def _validate(specs, input_shape):
    validate_layers(specs)
    text = specs[0]["type"] == "embeddingbag"
    if text != is_text_input(input_shape):
        got = list(input_shape) if isinstance(input_shape, (list, tuple)) else input_shape
        raise ConfigError("model.input must be [\"tokens\"] (or [\"tokens\", L]) for a model whose "
                          f"first layer is an embeddingbag, and only then; got input = {got!r}")
    if text:
        return
    if not isinstance(input_shape, (list, tuple)) or not input_shape or \
            not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
                    for s in input_shape):
        raise ConfigError(f"model.input must be a list of positive sizes, got {input_shape}")


def _keeps_split(specs, i, tp, at_end=True) -> bool:
    """Does the producer at ``i`` keep its output split (True) or gather it (False)?

    It keeps it when the next layer with parameters takes split input; a layernorm
    or a residual block first (they need the whole activation) makes it gather. At
    the end of ``specs``: ``at_end`` (True for the model: class-split logits; False
    in a residual branch, whose output is whole)."""
    if tp == 1:
        return False
    for s in specs[i + 1:]:
        if s["type"] in ("layernorm", "residual"):
            return False
        if s["type"] in ("linear", "conv2d"):
            return (s["type"], s.get("shard", "none")) in _CONSUMERS
    return at_end


def _named_sequential(layers, names):
    """A :class:`mpifc.nn.Sequential` whose children are named ``names`` (conv1, bn1, ...)."""
    seq = nn.Sequential(*layers)
    seq._child_names = list(names)
    return seq


def _rng(seed, *key):
    return np.random.default_rng([int(seed), *map(int, key)])


def build_model(model_cfg: dict, grid, *, seed: int, dtype=np.float32, xp=None) -> Net:
    """Build the :class:`Net` of ``model_cfg`` (``{"input": [...], "layers": [...]}``) on ``grid``.

    Every rank of the grid must call it (sharded weights are scattered over the
    tensor group). dp ranks get identical replicas from the seed; a
    :class:`~mpifc.parallel.DataParallel` built on the model bcasts them anyway.
    """
    _validate(model_cfg.get("layers", []), model_cfg.get("input", []))
    specs = [dict(s) for s in model_cfg["layers"]]
    text = is_text_input(model_cfg["input"])
    input_shape = (tuple(model_cfg["input"]) if text
                   else tuple(int(s) for s in model_cfg["input"]))
    tp, dp = grid.tp, grid.dp
    tpc, dpc = grid.tp_comm, grid.dp_comm
    dtype = np.dtype(dtype)
    kw = {"dtype": dtype, "xp": xp}

    def build_seq(specs, shape, split, path, key, prefix_name, at_end):
        """Build ``specs`` from per-sample ``shape`` (split over tp as ``split``) ->
        (layers, names, shape, split). ``path`` names them in errors (model.layers,
        model.layers[3].layers), ``key`` seeds them (layer j: rng [seed, *key, j]),
        ``prefix_name`` prefixes a sharded layer's trace name."""
        layers, names, counter = [], [], {}

        def need(ndim, i, t):
            if len(shape) != ndim:
                want = "(C, H, W)" if ndim == 3 else "(D,) features: add a flatten before it"
                raise ConfigError(f"{path}[{i}] ({t}) needs input {want}, gets {shape}")

        for i, s in enumerate(specs):
            t = s["type"]
            prefix = LAYERS[t][0]
            counter[prefix] = counter.get(prefix, 0) + 1
            name = f"{prefix}{counter[prefix]}"
            lname = name
            name = prefix_name + name          # trace phase prefix of a sharded layer
            shard = s.get("shard", "none") if tp > 1 else "none"
            rng = _rng(seed, *key, i)
            if t in ("linear", "conv2d") and split is not None and (t, shard) not in _CONSUMERS:
                raise ConfigError(f"{path}[{i}] ({t}, shard={shard}) gets a split input")  # planned away

            if t == "linear":
                need(1, i, t)
                Din, Fo = shape[0], int(s["out"])
                lkw = dict(bias=bool(s.get("bias", True)), init=s.get("init", "kaiming_uniform"), rng=rng, **kw)
                if shard == "column":
                    from mpifc.parallel.linear import ColumnParallelLinear

                    keep = _keeps_split(specs, i, tp, at_end)
                    layer = ColumnParallelLinear(Din, Fo, tpc, gather_output=not keep, name=name, **lkw)
                    split = shard_counts(Fo, tpc) if keep else None
                elif shard == "row":
                    from mpifc.parallel.linear import RowParallelLinear

                    layer = RowParallelLinear(Din, Fo, tpc, input_is_sharded=split is not None,
                                              in_counts=split, name=name, **lkw)
                    split = None
                else:
                    layer = nn.Linear(Din, Fo, **lkw)
                shape = (Fo,)

            elif t == "conv2d":
                need(3, i, t)
                C, H, W = shape
                K = int(s["out"])
                ckw = dict(stride=s.get("stride", 1), padding=s.get("padding", 0),
                           dilation=s.get("dilation", 1), bias=bool(s.get("bias", True)),
                           init=s.get("init", "kaiming_uniform"), rng=rng, **kw)
                if shard == "out":
                    from mpifc.parallel.conv import OutChannelParallelConv2d

                    keep = _keeps_split(specs, i, tp, at_end)
                    layer = OutChannelParallelConv2d(C, K, s["kernel"], tpc, gather_output=not keep,
                                                     name=name, **ckw)
                    split = shard_counts(K, tpc) if keep else None
                elif shard == "in":
                    from mpifc.parallel.conv import InChannelParallelConv2d

                    layer = InChannelParallelConv2d(C, K, s["kernel"], tpc, input_is_sharded=split is not None,
                                                    in_counts=split, name=name, **ckw)
                    split = None
                else:
                    layer = nn.Conv2d(C, K, s["kernel"], **ckw)
                (pt, pb), (pl, pr) = F.normalize_padding(ckw["padding"])
                (R, S_), (sh, sw), (dh, dw) = F._pair(s["kernel"]), F._pair(ckw["stride"]), F._pair(ckw["dilation"])
                shape = (K, F.conv_output_size(H, R, sh, pt, pb, dh), F.conv_output_size(W, S_, sw, pl, pr, dw))

            elif t in ("batchnorm2d", "batchnorm1d"):
                need(3 if t == "batchnorm2d" else 1, i, t)
                c_local = split[tpc.rank] if split is not None else shape[0]
                bkw = dict(eps=float(s.get("eps", 1e-5)), momentum=float(s.get("momentum", 0.1)), **kw)
                if dp > 1 or split is not None:
                    # statistics over the dp group (the global batch); on split channels the
                    # layer's gamma, beta and running stats are split over tp like them
                    from mpifc.parallel import norm

                    cls = norm.SyncBatchNorm2d if t == "batchnorm2d" else norm.SyncBatchNorm1d
                    layer = cls(c_local, dpc if dp > 1 else None, name=name,
                                channel_group=tpc if split is not None else None,
                                channel_counts=split, **bkw)
                else:
                    layer = (nn.BatchNorm2d if t == "batchnorm2d" else nn.BatchNorm1d)(c_local, **bkw)

            elif t in ("maxpool2d", "avgpool2d"):
                need(3, i, t)
                C, H, W = shape
                k = F._pair(s["kernel"])
                st = F._pair(s.get("stride", k))
                (pt, pb), (pl, pr) = F.normalize_padding(s.get("padding", 0))
                cls = nn.MaxPool2d if t == "maxpool2d" else nn.AvgPool2d
                layer = cls(k, stride=st, padding=s.get("padding", 0))
                shape = (C, F.conv_output_size(H, k[0], st[0], pt, pb), F.conv_output_size(W, k[1], st[1], pl, pr))

            elif t == "globalavgpool2d":
                need(3, i, t)
                layer = nn.GlobalAvgPool2d()
                shape = (shape[0],)

            elif t == "flatten":
                if split is not None:       # (c_r, H, W) -> c_r*H*W features, channel-major
                    per = math.prod(shape[1:])
                    split = tuple(c * per for c in split)
                layer = Flatten()
                shape = (math.prod(shape),)

            elif t == "embeddingbag":
                ekw = dict(mode=s.get("mode", "mean"), padding_idx=s.get("padding_idx"), rng=rng, **kw)
                if shard == "vocab":
                    from mpifc.parallel.embedding import VocabParallelEmbeddingBag

                    layer = VocabParallelEmbeddingBag(int(s["vocab"]), int(s["dim"]), tpc, name=name, **ekw)
                else:
                    layer = nn.EmbeddingBag(int(s["vocab"]), int(s["dim"]), **ekw)
                shape = (int(s["dim"]),)

            elif t == "dropout":
                layer = nn.Dropout(float(s.get("p", 0.5)), rng=_rng(seed, *key, i, grid.dp_rank))

            elif t == "layernorm":        # over the whole per-sample shape
                if split is not None:         # planned away (_keeps_split gathers before it)
                    raise ConfigError(f"{path}[{i}] (layernorm) gets a split input")
                layer = nn.LayerNorm(shape, eps=float(s.get("eps", 1e-5)), **kw)

            elif t == "residual":
                where = f"{path}[{i}] (residual)"
                if split is not None:         # planned away (_keeps_split gathers before it)
                    raise ConfigError(f"{where} gets a split input")
                bl, bn, bshape, bsplit = build_seq(s["layers"], shape, None, f"{path}[{i}].layers",
                                                   (*key, i, 0), f"{name}.body.", False)
                if bsplit is not None:        # planned away (a branch's last producer gathers)
                    raise ConfigError(f"{where}: its layers leave the output split over tp")
                body = _named_sequential(bl, bn)
                if "projection" in s:
                    pl, pn, pshape, psplit = build_seq(
                        _projection_list(s["projection"]), shape, None, f"{path}[{i}].projection",
                        (*key, i, 1), f"{name}.shortcut.", False)
                    if psplit is not None:
                        raise ConfigError(f"{where}: its projection leaves the output split over tp")
                    shortcut, what = _named_sequential(pl, pn), "projection output"
                else:
                    shortcut, pshape, what = None, shape, "input (identity shortcut)"
                if tuple(bshape) != tuple(pshape):
                    raise ConfigError(
                        f"{where}: its layers produce {tuple(bshape)} per sample but its {what} "
                        f"is {tuple(pshape)}; they are added, so they must match"
                        + ("" if "projection" in s else
                           " (add a projection, e.g. a 1x1 conv2d with the same stride and out)"))
                layer = nn.Residual(body, shortcut)
                shape = bshape

            else:  # elementwise activations
                layer = {"relu": lambda: nn.ReLU(), "gelu": lambda: nn.GELU(), "tanh": lambda: nn.Tanh(),
                         "sigmoid": lambda: nn.Sigmoid(),
                         "leakyrelu": lambda: nn.LeakyReLU(float(s.get("slope", 0.01)))}[t]()

            if any(d < 1 for d in shape):
                raise ConfigError(f"{path}[{i}] ({t}) produces an empty output {shape}")
            layers.append(layer)
            names.append(lname)
        return layers, names, shape, split

    # per-sample logical (global) shape; () = a text model's tokens (its embeddingbag
    # first layer makes them (dim,))
    layers, names, shape, split = build_seq(specs, () if text else input_shape, None,
                                            "model.layers", (), "", True)

    if len(shape) != 1:
        raise ConfigError(f"model output per sample is {shape}; it must be (classes,)")
    num_classes = next(int(s["out"]) for s in reversed(specs) if s["type"] == "linear")
    if shape[0] != num_classes:
        raise ConfigError(f"model output has {shape[0]} values per sample but the last linear "
                          f"layer has out={num_classes}")
    if split is not None:
        loss = ClassParallelLoss(num_classes, tpc, dtype)
    else:
        loss = LocalLoss(num_classes)
    return Net(layers, names, grid, loss, input_shape, num_classes, logits_sharded=split is not None)
