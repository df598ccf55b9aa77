"""Analytic workload: one rank's training step from a training config and a layout.

b local batch (rows of the global batch on this data-parallel rank), t tensor-parallel
group size, D/F features in/out, C/K channels in/out, H x W image, R x S kernel,
s itemsize (bytes per element). "_r" marks this rank's shard (balanced counts,
larger shards first, so tp rank 0 holds the largest one and is the slowest).

The shapes are computed, never built: a 16384-rank layout costs as little as a
2-rank one (a few microseconds per layer). Each layer type follows its row of the
communication contract (shared/DESIGN.md) exactly as the classes of
:mod:`mpifc.parallel` issue it, so the list of messages here equals the trace of a
real step (``tests/sim/test_sim_workload.py`` checks it against the layers'
``collectives()`` and against a recorded step):

    column linear     fwd  allgather(v) of (b, F_r)     only if gathered
                      bwd  allreduce of (b, D)          unless it is the first layer
    row linear        fwd  allreduce of (b, F)
                      bwd  allgather(v) of (b, D_r)     only if its input was whole
    out-channel conv  fwd  allgather(v) of (b, K_r, Ho, Wo) only if gathered
                      bwd  allreduce of (b, C, H, W)    unless it is the first layer
    in-channel conv   fwd  allreduce of (b, K, Ho, Wo)
                      bwd  allgather(v) of (b, C_r, H, W) only if its input was whole
    class-parallel loss  fwd allreduce max (b), allreduce sums (2b);
                         metrics allreduce min (b, int64) when accuracy is computed
    data parallel     bwd  iallreduce over dp of each gradient bucket (<= bucket_mb),
                           started when its last gradient is ready, overlappable

Sharding decisions mirror how a model is assembled from a config: a column (or
out-channel) layer keeps its output sharded when the next layer with parameters
takes a sharded input (a row linear, an in-channel conv) or when it produces the
logits (the class-parallel loss takes them sharded); otherwise it gathers. Per-channel
layers (BatchNorm, activations, pooling) keep a channel-sharded tensor as it is, and
flatten turns C_r channels into C_r*H*W features (the row layer's ``in_counts``).
The first layer with parameters computes no input gradient.

Compute: GEMM and convolution FLOPs (2 per multiply-add, the layers' own ``flops``);
element-wise work as bytes moved (reads + writes) counted from the NumPy code of
each layer (see ``_PASSES``), since those kernels are memory-bound.

Memory per rank: parameters + gradients + optimizer slots + data-parallel bucket
buffers + what the forward keeps for the backward (layer inputs, im2col columns,
masks, normalised activations) + the largest live activation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpifc.comm.counts import balanced_counts
from mpifc.nn import functional as F
from mpifc.parallel.describe import Collective
from mpifc.sim.engine import Phase, Workload
from mpifc.sim.planner import LayoutInfeasible

# Bytes moved per element (in units of the itemsize s, reads + writes) by the NumPy
# code of each element-wise kernel; counted from mpifc.nn.functional and mpifc.optim.
_PASSES = {
    "bias_fwd": 2, "bias_bwd": 1,            # y += b ; db = dy.sum(0)
    "relu_fwd": 3.25, "relu_bwd": 2.25,      # max(x,0), mask=y>0 (1 byte) ; dy*mask
    "act_fwd": 6, "act_bwd": 8,              # tanh / sigmoid / gelu / leaky: a few passes
    "bn_fwd": 11, "bn_bwd": 20,              # sums, (x-m)*invstd, *g+b ; stats, 6 passes
    "ln_fwd": 11, "ln_bwd": 20,
    "pool_fwd": 4, "pool_bwd": 4,            # per window offset, per output element
    "dropout_fwd": 4, "dropout_bwd": 2,
    "loss_fwd": 7, "loss_bwd": 5, "metrics": 3,
    "sgd": 10, "sgd_wd": 15, "adam": 32,     # per parameter element, with zero_grad
    "dp_pack": 4,                            # copy grads into the bucket and back, scale
}

ELEMENTWISE = {"relu", "leaky_relu", "gelu", "tanh", "sigmoid", "dropout", "identity"}
POOLS = {"maxpool2d", "avgpool2d"}
NORMS = {"batchnorm2d", "batchnorm1d", "batchnorm", "layernorm"}


class WorkloadError(ValueError):
    """A model config the analytic workload cannot describe (names the layer)."""


@dataclass
class _Act:
    """The activation flowing between layers: per-sample global shape and its split.

    split  None (replicated over the tensor group) or the sample axis that is split
           (0: features of a vector, channels of an image)
    counts global length of that axis on each tp rank (balanced, larger first)
    """

    shape: tuple
    split: int | None = None
    counts: tuple = ()

    def local(self, r: int) -> tuple:
        if self.split is None:
            return self.shape
        s = list(self.shape)
        s[self.split] = self.counts[r]
        return tuple(s)


@dataclass
class StepDescription:
    """Everything the analytic model says about one rank's step.

    collectives   the messages in program order, in the trace convention
                  (describe.Collective: count = this rank's buffer argument)
    workload      the engine's Workload (phases with FLOPs, bytes, comm sizes)
    params        parameter elements held by this rank
    memory        bytes per rank, by part
    """

    collectives: list[Collective]
    workload: Workload
    params: int
    memory: dict[str, float] = field(default_factory=dict)


def _prod(xs) -> int:
    return int(math.prod(xs))


def _ltype(spec: dict) -> str:
    return str(spec.get("type", "")).lower().replace("-", "_")


def _shard(spec: dict) -> str:
    s = spec.get("shard", "none")
    return "none" if s in (None, False, "", "none", "replicate", "replicated") else str(s).lower()


def _has_params(spec: dict) -> bool:
    t = _ltype(spec)
    return t in ("linear", "conv2d") or (t in NORMS and spec.get("affine", True))


def _consumes_sharded(spec: dict) -> bool:
    t, sh = _ltype(spec), _shard(spec)
    return (t == "linear" and sh == "row") or (t == "conv2d" and sh == "in")


def _keeps_output_sharded(layers: list[dict], i: int) -> bool:
    """A column / out-channel layer at i keeps its output sharded (no allgather) when the
    next layer with GEMM parameters takes a sharded input, or when it is the last one
    (its output is the class-sharded logits)."""
    for spec in layers[i + 1:]:
        if _ltype(spec) in ("linear", "conv2d"):
            return _consumes_sharded(spec)
    return True


def _layer_name(i: int, spec: dict) -> str:
    return str(spec.get("name") or f"{_ltype(spec)}{i}")


def _bucket_bytes(bucket_mb: float) -> float:
    return float(bucket_mb) * 2 ** 20


def _gather_sim_bytes(block_counts, itemsize) -> float:
    return float(sum(block_counts)) * itemsize


def describe_step(cfg: dict, dp: int, tp: int, *, global_batch: int | None = None,
                  local_batch: int | None = None, dp_rank: int = 0, tp_rank: int = 0,
                  bucket_mb: float | None = None, accuracy: bool = True,
                  dp_always: bool = True, names: list[str] | None = None,
                  num_classes: int | None = None) -> StepDescription:
    """The analytic step of ``cfg`` (a dict from :func:`mpifc.config.load_config`) on one
    rank of a dp x tp layout.

    Parameters
    ----------
    dp, tp : layout
    global_batch : samples per step over all dp replicas (default: train.batch_size);
        split over dp with balanced counts, ``dp_rank`` takes its share
    local_batch : rows per dp replica instead (weak scaling: global = local * dp)
    dp_rank, tp_rank : the rank described (0: the largest shards, the slowest rank)
    bucket_mb : gradient bucket cap (default parallel.bucket_mb)
    accuracy : the step computes accuracy (the class-parallel metrics allreduce)
    dp_always : gradient buckets are allreduced even at dp = 1 (a size-1 group: free,
        but the trace records the calls)
    names : trace phase prefix of each config layer (default "<type><index>")
    num_classes : classes of the loss (default: the last layer's ``out``)

    Raises LayoutInfeasible for a layout that leaves a replica without samples, and
    WorkloadError for a config it cannot describe.
    """
    if dp < 1 or tp < 1:
        raise LayoutInfeasible(f"dp and tp must be >= 1 (got {dp} x {tp})")
    if not 0 <= dp_rank < dp or not 0 <= tp_rank < tp:
        raise ValueError(f"rank ({dp_rank}, {tp_rank}) is outside the {dp} x {tp} grid")
    s = int(np.dtype(cfg["train"].get("dtype", "float32")).itemsize)
    if local_batch is not None:
        B = int(local_batch) * dp
    else:
        B = int(global_batch if global_batch is not None else cfg["train"]["batch_size"])
    if B < dp:
        raise LayoutInfeasible(f"dp={dp} > global batch {B}: some replicas would get no "
                               f"samples (give a larger batch, or a per-replica batch)")
    b = balanced_counts(B, dp)[0][dp_rank]
    bucket = _bucket_bytes(cfg["parallel"].get("bucket_mb", 25.0) if bucket_mb is None else bucket_mb)

    layers = list(cfg["model"]["layers"])
    if names is not None and len(names) != len(layers):
        raise ValueError(f"names has {len(names)} entries for {len(layers)} layers")
    act = _Act(tuple(int(v) for v in cfg["model"]["input"]))
    first_param = next((i for i, l in enumerate(layers) if _has_params(l)), len(layers))

    fwd_ph: list[Phase] = []        # forward phases, in order
    fwd_cc: list[Collective] = []
    bwd_blocks: list[tuple] = []    # per layer: (phases, collectives, param elements)
    params = 0
    param_list: list[int] = []      # local parameter sizes, in parameters() order
    keep = 0.0                      # bytes the forward keeps for the backward
    peak_act = _prod(act.shape) * b * s
    r = tp_rank

    def comm(label, op, count, *, group="tp", stage="forward", sim_bytes=None, itemsize=s,
             sim_op=None):
        c = Collective(label, op, group, int(count), int(itemsize))
        ph = Phase("comm", f"{label}.{op}", op=sim_op or op, group=group,
                   bytes=float(c.bytes if sim_bytes is None else sim_bytes), stage=stage)
        return c, ph

    def gemm(label, flops, stage, kind="gemm"):
        return Phase("compute", label, flops=float(flops), op_kind=kind, stage=stage)

    def elem(label, nbytes, stage):
        return Phase("compute", label, bytes=float(nbytes), op_kind="elementwise", stage=stage)

    for i, spec in enumerate(layers):
        t, sh = _ltype(spec), _shard(spec)
        name = names[i] if names is not None else _layer_name(i, spec)
        where = f"model.layers[{i}] ({t}{', shard ' + sh if sh != 'none' else ''})"
        in_grad = i > first_param
        skip_bwd = i < first_param            # layers before the first parametric one
        xl = act.local(r)
        n_in = b * _prod(xl)
        f_ph, f_cc, b_ph, b_cc, lp = [], [], [], [], []

        if t == "linear":
            if len(act.shape) != 1:
                raise WorkloadError(f"{where}: input {act.shape} is not a vector; add a flatten")
            D, Fo = act.shape[0], int(spec["out"])
            bias = spec.get("bias", True)
            if sh == "column":
                if act.split is not None:
                    raise WorkloadError(f"{where}: a column-parallel linear needs a replicated "
                                        "input, but its input is sharded")
                oc = balanced_counts(Fo, tp)[0]
                Fr = oc[r]
                gather = not _keeps_output_sharded(layers, i)
                f_ph.append(gemm(f"{name}.forward", 2 * b * D * Fr, "forward"))
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fr * s, "forward"))
                if gather:
                    c, ph = comm(f"{name}.forward", "allgather", b * Fr,
                                 sim_bytes=_gather_sim_bytes(oc, b * s), sim_op="allgatherv")
                    f_cc.append(c); f_ph.append(ph)
                    act = _Act((Fo,))
                else:
                    act = _Act((Fo,), 0, tuple(oc))
                b_ph.append(gemm(f"{name}.backward", 2 * b * D * Fr * (2 if in_grad else 1), "backward"))
                if bias:
                    b_ph.append(elem(f"{name}.backward.db", _PASSES["bias_bwd"] * b * Fr * s, "backward"))
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", b * D, stage="backward")
                    b_cc.append(c); b_ph.append(ph)
                lp = [Fr * D] + ([Fr] if bias else [])
                keep += n_in * s
            elif sh == "row":
                sharded_in = act.split is not None
                ic = act.counts if sharded_in else balanced_counts(D, tp)[0]
                if sum(ic) != D or len(ic) != tp:
                    raise WorkloadError(f"{where}: input split {ic} does not fit {D} features")
                Dr = ic[r]
                f_ph.append(gemm(f"{name}.forward", 2 * b * Dr * Fo, "forward"))
                c, ph = comm(f"{name}.forward", "allreduce", b * Fo)
                f_cc.append(c); f_ph.append(ph)
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fo * s, "forward"))
                b_ph.append(gemm(f"{name}.backward", 2 * b * Dr * Fo * (2 if in_grad else 1), "backward"))
                if bias:
                    b_ph.append(elem(f"{name}.backward.db", _PASSES["bias_bwd"] * b * Fo * s, "backward"))
                if in_grad and not sharded_in:
                    c, ph = comm(f"{name}.backward", "allgather", b * Dr, stage="backward",
                                 sim_bytes=_gather_sim_bytes(ic, b * s), sim_op="allgatherv")
                    b_cc.append(c); b_ph.append(ph)
                lp = [Fo * Dr] + ([Fo] if bias else [])
                keep += b * Dr * s
                act = _Act((Fo,))
            elif sh == "none":
                if act.split is not None:
                    raise WorkloadError(f"{where}: a serial linear needs a replicated input")
                f_ph.append(gemm(f"{name}.forward", 2 * b * D * Fo, "forward"))
                b_ph.append(gemm(f"{name}.backward", 2 * b * D * Fo * (2 if in_grad else 1), "backward"))
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fo * s, "forward"))
                    b_ph.append(elem(f"{name}.backward.db", _PASSES["bias_bwd"] * b * Fo * s, "backward"))
                lp = [Fo * D] + ([Fo] if bias else [])
                keep += n_in * s
                act = _Act((Fo,))
            else:
                raise WorkloadError(f"{where}: linear shard must be column, row or none")

        elif t == "conv2d":
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            K = int(spec["out"])
            R, S_ = F._pair(spec.get("kernel", spec.get("kernel_size", 3)))
            stride = F._pair(spec.get("stride", 1))
            dil = F._pair(spec.get("dilation", 1))
            (pt, pb), (pl, pr) = F.normalize_padding(spec.get("padding", 0))
            Ho = F.conv_output_size(H, R, stride[0], pt, pb, dil[0])
            Wo = F.conv_output_size(W, S_, stride[1], pl, pr, dil[1])
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for kernel {R}x{S_}")
            bias = spec.get("bias", True)
            if sh == "out":
                if act.split is not None:
                    raise WorkloadError(f"{where}: an out-channel conv needs a replicated input")
                oc = balanced_counts(K, tp)[0]
                Kr, Cr, Kout = oc[r], C, oc[r]
                gather = not _keeps_output_sharded(layers, i)
                f = 2 * b * Kr * Ho * Wo * C * R * S_
                f_ph.append(Phase("compute", f"{name}.forward", flops=float(f), op_kind="conv"))
                if gather:
                    c, ph = comm(f"{name}.forward", "allgather", b * Kr * Ho * Wo,
                                 sim_bytes=_gather_sim_bytes(oc, b * Ho * Wo * s), sim_op="allgatherv")
                    f_cc.append(c); f_ph.append(ph)
                    act = _Act((K, Ho, Wo))
                else:
                    act = _Act((K, Ho, Wo), 0, tuple(oc))
                b_ph.append(Phase("compute", f"{name}.backward", flops=float(f * (2 if in_grad else 1)),
                                  op_kind="conv", stage="backward"))
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", b * C * H * W, stage="backward")
                    b_cc.append(c); b_ph.append(ph)
                lp = [Kr * C * R * S_] + ([Kr] if bias else [])
            elif sh == "in":
                sharded_in = act.split is not None
                ic = act.counts if sharded_in else balanced_counts(C, tp)[0]
                if sum(ic) != C or len(ic) != tp:
                    raise WorkloadError(f"{where}: input split {ic} does not fit {C} channels")
                Cr, Kout = ic[r], K
                f = 2 * b * K * Ho * Wo * Cr * R * S_
                f_ph.append(Phase("compute", f"{name}.forward", flops=float(f), op_kind="conv"))
                c, ph = comm(f"{name}.forward", "allreduce", b * K * Ho * Wo)
                f_cc.append(c); f_ph.append(ph)
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * K * Ho * Wo * s,
                                     "forward"))
                b_ph.append(Phase("compute", f"{name}.backward", flops=float(f * (2 if in_grad else 1)),
                                  op_kind="conv", stage="backward"))
                if in_grad and not sharded_in:
                    c, ph = comm(f"{name}.backward", "allgather", b * Cr * H * W, stage="backward",
                                 sim_bytes=_gather_sim_bytes(ic, b * H * W * s), sim_op="allgatherv")
                    b_cc.append(c); b_ph.append(ph)
                lp = [K * Cr * R * S_] + ([K] if bias else [])
                act = _Act((K, Ho, Wo))
            elif sh == "none":
                if act.split is not None:
                    raise WorkloadError(f"{where}: a serial conv needs a replicated input")
                Cr, Kout = C, K
                f = 2 * b * K * Ho * Wo * C * R * S_
                f_ph.append(Phase("compute", f"{name}.forward", flops=float(f), op_kind="conv"))
                b_ph.append(Phase("compute", f"{name}.backward", flops=float(f * (2 if in_grad else 1)),
                                  op_kind="conv", stage="backward"))
                lp = [K * C * R * S_] + ([K] if bias else [])
                act = _Act((K, Ho, Wo))
            else:
                raise WorkloadError(f"{where}: conv2d shard must be out, in or none")
            # the forward keeps the im2col columns (C_r*R*S, b*Ho*Wo)
            keep += Cr * R * S_ * b * Ho * Wo * s

        elif t in NORMS:
            n = n_in
            kind = "ln" if t == "layernorm" else "bn"
            f_ph.append(elem(f"{name}.forward", _PASSES[f"{kind}_fwd"] * n * s, "forward"))
            b_ph.append(elem(f"{name}.backward", _PASSES[f"{kind}_bwd"] * n * s, "backward"))
            if spec.get("affine", True):
                c_loc = xl[0] if kind == "bn" else _prod(act.shape)
                if kind == "ln" and act.split is not None:
                    raise WorkloadError(f"{where}: LayerNorm over a sharded axis is not supported")
                lp = [c_loc, c_loc]
            keep += n * s

        elif t in ELEMENTWISE:
            k = "relu" if t == "relu" else ("dropout" if t == "dropout" else "act")
            f_ph.append(elem(f"{name}.forward", _PASSES[f"{k}_fwd"] * n_in * s, "forward"))
            b_ph.append(elem(f"{name}.backward", _PASSES[f"{k}_bwd"] * n_in * s, "backward"))
            keep += n_in * (1 if t in ("relu", "dropout", "leaky_relu") else s)

        elif t in POOLS:
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            R, S_ = F._pair(spec.get("kernel", spec.get("kernel_size", 2)))
            st = F._pair(spec.get("stride") or (R, S_))
            (pt, pb), (pl, pr) = F.normalize_padding(spec.get("padding", 0))
            Ho = F.conv_output_size(H, R, st[0], pt, pb)
            Wo = F.conv_output_size(W, S_, st[1], pl, pr)
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for pool {R}x{S_}")
            out_n = b * xl[0] * Ho * Wo
            f_ph.append(elem(f"{name}.forward", _PASSES["pool_fwd"] * R * S_ * out_n * s, "forward"))
            b_ph.append(elem(f"{name}.backward", _PASSES["pool_bwd"] * R * S_ * out_n * s
                             + n_in * s, "backward"))
            keep += out_n
            act = _Act((C, Ho, Wo), act.split, act.counts)

        elif t == "globalavgpool2d":
            C = act.shape[0]
            f_ph.append(elem(f"{name}.forward", n_in * s, "forward"))
            b_ph.append(elem(f"{name}.backward", n_in * s, "backward"))
            act = _Act((C,), act.split, act.counts)

        elif t == "flatten":
            if act.split not in (None, 0):
                raise WorkloadError(f"{where}: cannot flatten a tensor split on axis {act.split}")
            rest = _prod(act.shape[1:])
            act = _Act((_prod(act.shape),), act.split,
                       tuple(c * rest for c in act.counts) if act.split is not None else ())

        else:
            raise WorkloadError(f"{where}: unknown layer type {t!r}")

        fwd_ph += f_ph
        fwd_cc += f_cc
        if not skip_bwd:
            bwd_blocks.append((b_ph, b_cc, lp))
        params += sum(lp)
        param_list += lp
        peak_act = max(peak_act, b * _prod(act.local(r)) * s)

    # ---- loss (class-parallel softmax cross-entropy over the tensor group) ----
    if len(act.shape) != 1:
        raise WorkloadError(f"the model's output {act.shape} is not a vector of class scores")
    Q = int(num_classes or act.shape[0])
    Qr = act.local(r)[0] if act.split is not None else balanced_counts(Q, tp)[0][r]
    loss_cc = [Collective("loss.forward", "allreduce", "tp", b, s),
               Collective("loss.forward", "allreduce", "tp", 2 * b, s)]
    loss_ph = [elem("loss.forward", _PASSES["loss_fwd"] * b * Qr * s, "forward")]
    loss_ph += [Phase("comm", f"{c.phase}.allreduce", op="allreduce", group="tp",
                      bytes=float(c.bytes), stage="forward") for c in loss_cc]
    if accuracy:
        m = Collective("loss.metrics", "allreduce", "tp", b, 8)
        loss_cc.append(m)
        loss_ph += [elem("loss.metrics", _PASSES["metrics"] * b * Qr * s, "forward"),
                    Phase("comm", "loss.metrics.allreduce", op="allreduce", group="tp",
                          bytes=float(m.bytes), stage="forward")]
    loss_ph.append(elem("loss.backward", _PASSES["loss_bwd"] * b * Qr * s, "backward"))

    # ---- backward, with the data-parallel buckets (reverse parameter order) ----
    bwd_ph: list[Phase] = []
    bwd_cc: list[Collective] = []
    dp_cc: list[Collective] = []
    do_dp = dp > 1 or dp_always
    pending, pending_bytes, nb = 0, 0.0, 0

    def flush():
        nonlocal pending, pending_bytes, nb
        if pending:
            c = Collective("dp.backward", "iallreduce", "dp", pending, s)
            dp_cc.append(c)
            bwd_ph.append(Phase("comm", f"dp.bucket{nb}.iallreduce", op="allreduce", group="dp",
                                bytes=float(c.bytes), overlappable=True, stage="backward"))
            nb += 1
        pending, pending_bytes = 0, 0.0

    for ph_list, cc, lp in reversed(bwd_blocks):
        bwd_ph += ph_list
        bwd_cc += cc
        if not do_dp:
            continue
        for n in reversed(lp):                   # gradients of this layer, last first
            if pending and pending_bytes + n * s > bucket:
                flush()
            pending += n
            pending_bytes += n * s
        # a bucket goes out once full; a partial one waits for more gradients
        if pending_bytes >= bucket:
            flush()
    if do_dp:
        flush()

    # ---- optimizer (element-wise over the local parameters) ----
    o = cfg["optim"]
    if o["name"] == "sgd":
        passes = _PASSES["sgd_wd"] if o.get("weight_decay") else _PASSES["sgd"]
        slots = 1 if o.get("momentum") else 0
    else:
        passes, slots = _PASSES["adam"], 2
    opt_ph = [elem("optimizer.step", passes * params * s, "optimizer")]
    if do_dp:
        opt_ph.insert(0, elem("dp.pack", _PASSES["dp_pack"] * params * s, "optimizer"))
    if o.get("clip_norm"):
        opt_ph.insert(0, elem("clip.norm", 2 * params * s, "optimizer"))

    phases = fwd_ph + loss_ph + bwd_ph + opt_ph
    collectives = fwd_cc + loss_cc + bwd_cc + dp_cc
    memory = {
        "parameters": params * s,
        "gradients": params * s,
        "optimizer": slots * params * s,
        "dp_buckets": params * s if do_dp else 0,
        "activations": keep + 2 * peak_act,
    }
    wl = Workload(name=f"{cfg.get('name', 'model')} dp={dp} tp={tp} batch={B}", phases=phases,
                  samples_per_step=B, memory_bytes_per_rank=float(sum(memory.values())),
                  dp=dp, tp=tp)
    return StepDescription(collectives, wl, params, memory)


def config_workload(cfg: dict, dp: int, tp: int, **kw) -> Workload:
    """The engine :class:`Workload` of :func:`describe_step` (slowest rank: dp/tp rank 0)."""
    return describe_step(cfg, dp, tp, **kw).workload


def workload_builder(cfg: dict, **kw):
    """``build(dp, tp) -> Workload`` for :func:`mpifc.sim.planner.workload_cost`."""
    def build(dp: int, tp: int) -> Workload:
        return config_workload(cfg, dp, tp, **kw)
    return build
