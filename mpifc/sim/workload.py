"""Analytic workload: one rank's training step from a training config and a layout.

b local batch (rows of the global batch on this data-parallel rank), t tensor-parallel
group size, D/F features in/out, C/K channels in/out, H x W image, R x S kernel,
s itemsize (bytes per element). "_r" marks this rank's shard (balanced counts,
larger shards first, so tp rank 0 holds the largest one and is the slowest).

The shapes are computed, never built: a 16384-rank layout costs as little as a
2-rank one (a few microseconds per layer). The model is the one
:func:`mpifc.models.build_model` assembles from the same config and the step is the
trainer's (forward, loss and accuracy, backward with data-parallel buckets,
clipping, optimizer), so the messages listed here are exactly those of a real step
(``tests/sim/test_sim_workload.py`` compares them with the trace at 1-4 ranks):

    on tp = 1 every layer is the serial one: no tensor-parallel message at all
    column linear     fwd  allgather(v) of (b, F_r)       only if gathered
                      bwd  allreduce of (b, D)            unless it is the first layer
    row linear        fwd  allreduce of (b, F)
                      bwd  allgather(v) of (b, D_r)       only if its input was whole
    out-channel conv  fwd  allgather(v) of (b, K_r, Ho, Wo) only if gathered
                      bwd  allreduce of (b, C, H, W)      unless it is the first layer
    in-channel conv   fwd  allreduce of (b, K, Ho, Wo)
                      bwd  allgather(v) of (b, C_r, H, W) only if its input was whole
    BatchNorm, dp > 1 fwd  allreduce over dp of 2C_r + 2 (sums, count)
                      bwd  allreduce over dp of 2C_r      unless it is the first layer
    class-split logits   fwd allreduce max (b), allreduce sums (2b); accuracy: allreduce
                         min (b, int64); whole logits: a local loss, no message
    data parallel     iallreduce over dp of each gradient bucket (reverse parameter
                      order, filled to bucket_mb MiB or total/min_buckets, a parameter
                      cut at row boundaries), started once its last piece is final: a
                      linear layer's dW row block, else the end of the layer's backward
                      (overlappable); blocking mode: allreduce after the backward;
                      nothing on dp = 1
    clipping, tp > 1  allreduce over tp of one float64
    trainer           allreduce over the world of one float64 (the loss is finite on
                      every rank); data.mode = "scatter": scatter(v) of the batch rows
                      (uint8 images) and labels over dp

A column (or out-channel) layer keeps its output split when the next layer with
GEMM parameters takes a split input (a row linear, an in-channel conv) or when it
produces the logits; otherwise it gathers. Per-channel layers keep a channel-split
tensor as it is, and flatten turns C_r channels into C_r*H*W features. The first
layer with parameters computes no input gradient, and the layers before it run no
backward.

Compute: GEMM and convolution FLOPs (2 per multiply-add, the layers' own ``flops``);
element-wise work as bytes moved (reads + writes) counted from the NumPy code of
each layer (see ``_PASSES``), since those kernels are memory-bound.

Memory per rank: parameters + gradients (the bucket buffers) + optimizer slots +
what the forward keeps for the backward (layer inputs, im2col columns,
masks, normalised activations) + the largest live activation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpifc.comm.counts import balanced_counts
from mpifc.nn import functional as F
from mpifc.parallel.data import MIN_BUCKETS
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
    "pool_fwd": 6, "pool_bwd": 5,            # per window offset and output element:
                                             # compare, masked index store, max ; mask,
                                             # where, strided store (+ zero fill, copy)
    "dropout_fwd": 4, "dropout_bwd": 2,
    "loss_fwd": 7, "loss_bwd": 5, "metrics": 3,
    "sgd": 10, "sgd_wd": 15, "adam": 32,     # per parameter element, with zero_grad
}

ELEMENTWISE = {"relu", "leakyrelu", "gelu", "tanh", "sigmoid", "dropout"}
POOLS = {"maxpool2d", "avgpool2d"}
NORMS = {"batchnorm2d", "batchnorm1d"}
# child-name prefixes of mpifc.models (numbered per prefix: conv1, bn1, relu1, fc1, ...)
PREFIX = {"linear": "fc", "conv2d": "conv", "batchnorm2d": "bn", "batchnorm1d": "bn",
          "relu": "relu", "leakyrelu": "relu", "gelu": "gelu", "tanh": "tanh",
          "sigmoid": "sigmoid", "maxpool2d": "pool", "avgpool2d": "pool",
          "globalavgpool2d": "pool", "flatten": "flatten", "dropout": "dropout"}
_PRODUCERS = {("linear", "column"), ("conv2d", "out")}
_CONSUMERS = {("linear", "row"), ("conv2d", "in")}


class WorkloadError(ValueError):
    """A model config the analytic workload cannot describe (names the layer)."""


@dataclass
class _Act:
    """The activation flowing between layers: per-sample global shape and its split.

    counts  None (replicated over the tensor group) or the channels / features of
            axis 0 of the sample on each tp rank (balanced, larger first)
    """

    shape: tuple
    counts: tuple | None = None

    def local(self, r: int) -> tuple:
        if self.counts is None:
            return self.shape
        return (self.counts[r],) + tuple(self.shape[1:])


@dataclass
class StepDescription:
    """Everything the analytic model says about one rank's step.

    collectives   the messages in trace order (describe.Collective: count = this
                  rank's buffer argument); data-parallel buckets last, as the trace
                  records a non-blocking allreduce at its wait
    workload      the engine's Workload (phases with FLOPs, bytes, comm sizes)
    params        parameter elements held by this rank
    memory        bytes per rank, by part
    names         trace name of each config layer
    """

    collectives: list[Collective]
    workload: Workload
    params: int
    memory: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


def _prod(xs) -> int:
    return int(math.prod(xs))


def _keeps_split(layers: list[dict], i: int, tp: int) -> bool:
    """A column / out-channel layer at i keeps its output split (no allgather) when the
    next layer with GEMM parameters takes a split input, or when it is the last one
    (its output is the class-split logits). On tp = 1 nothing is split."""
    if tp == 1:
        return False
    for spec in layers[i + 1:]:
        if spec["type"] in ("linear", "conv2d"):
            return (spec["type"], spec.get("shard", "none")) in _CONSUMERS
    return True


def _has_params(spec: dict) -> bool:
    return spec["type"] in ("linear", "conv2d") or spec["type"] in NORMS


def describe_step(cfg: dict, dp: int, tp: int, *, global_batch: int | None = None,
                  local_batch: int | None = None, dp_rank: int = 0, tp_rank: int = 0,
                  bucket_mb: float | None = None, overlap: bool | None = None,
                  min_buckets: int = MIN_BUCKETS, accuracy: bool = True,
                  finite_check: bool = True) -> StepDescription:
    """The analytic step of ``cfg`` (a dict from :func:`mpifc.config.load_config`) on one
    rank of a dp x tp layout, as the trainer runs it: forward, class-parallel loss
    and accuracy, backward with data-parallel buckets, clipping, optimizer.

    Parameters
    ----------
    dp, tp : layout
    global_batch : samples per step over all dp replicas (default: train.batch_size);
        split over dp with balanced counts, ``dp_rank`` takes its share
    local_batch : rows per dp replica instead (weak scaling: global = local * dp)
    dp_rank, tp_rank : the rank described (0: the largest shards, the slowest rank)
    bucket_mb, overlap : data-parallel buckets (default: the config's [parallel])
    min_buckets : DataParallel's ``min_buckets`` (the cap is at most total / min_buckets)
    accuracy : the step computes accuracy (the class-parallel metrics allreduce)
    finite_check : the trainer's per-step agreement that the loss is finite (one
        allreduce max of a float64 over the world, phase "check.finite")

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
    par = cfg["parallel"]
    cap = int(float(par.get("bucket_mb", 25.0) if bucket_mb is None else bucket_mb) * 2 ** 20)
    overlap = bool(par.get("overlap", True) if overlap is None else overlap)

    layers = [dict(l) for l in cfg["model"]["layers"]]
    act = _Act(tuple(int(v) for v in cfg["model"]["input"]))
    first_param = next((i for i, l in enumerate(layers) if _has_params(l)), len(layers))
    r = tp_rank

    fwd_ph: list[Phase] = []
    fwd_cc: list[Collective] = []
    blocks: list[tuple] = []        # per layer run in backward: (phases, collectives, params,
                                    # their rows on axis 0, index of the dW-in-row-blocks phase)
    names: list[str] = []
    counter: dict[str, int] = {}
    param_sizes: list[int] = []     # local parameter sizes, in parameters() order
    keep = 0.0                      # bytes the forward keeps for the backward
    peak = b * _prod(act.shape) * s

    def comm(label, op, count, group, stage, sim_op=None, sim_bytes=None, itemsize=s):
        c = Collective(label, op, group, int(count), int(itemsize))
        ph = Phase("comm", f"{label}.{op}", op=sim_op or op, group=group,
                   bytes=float(c.bytes if sim_bytes is None else sim_bytes), stage=stage)
        return c, ph

    def compute(label, flops, kind, stage):
        return Phase("compute", label, flops=float(flops), op_kind=kind, stage=stage)

    def elem(label, nbytes, stage):
        return Phase("compute", label, bytes=float(nbytes), op_kind="elementwise", stage=stage)

    for i, spec in enumerate(layers):
        t = spec.get("type")
        if t not in PREFIX:
            raise WorkloadError(f"model.layers[{i}]: unknown layer type {t!r}")
        pre = PREFIX[t]
        counter[pre] = counter.get(pre, 0) + 1
        name = f"{pre}{counter[pre]}"
        names.append(name)
        sh = spec.get("shard", "none") if tp > 1 else "none"
        where = f"model.layers[{i}] ({t}{', shard ' + sh if sh != 'none' else ''})"
        in_grad = i > first_param
        xl = act.local(r)
        n_in = b * _prod(xl)
        f_ph, f_cc, b_ph, b_cc, lp = [], [], [], [], []
        rows, w_at = None, None         # rows of lp (default: 1-d), phase of dW in row blocks
        if t in ("linear", "conv2d") and act.counts is not None and (t, sh) not in _CONSUMERS:
            raise WorkloadError(f"{where} gets a split input")

        if t == "linear":
            if len(act.shape) != 1:
                raise WorkloadError(f"{where}: input {act.shape} is not a vector; add a flatten")
            D, Fo = act.shape[0], int(spec["out"])
            bias = bool(spec.get("bias", True))
            if sh == "column":
                oc = balanced_counts(Fo, tp)[0]
                Din, Fl, Fout = D, oc[r], oc[r]
                keep_split = _keeps_split(layers, i, tp)
                f_ph.append(compute(f"{name}.forward", 2 * b * D * Fl, "gemm", "forward"))
                if not keep_split:
                    c, ph = comm(f"{name}.forward", "allgather", b * Fl, "tp", "forward",
                                 "allgatherv", b * Fo * s)
                    f_cc.append(c); f_ph.append(ph)
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", b * D, "tp", "backward")
                    b_cc.append(c)
                    post = [ph]
                else:
                    post = []
                new = _Act((Fo,), tuple(oc) if keep_split else None)
            elif sh == "row":
                split_in = act.counts is not None
                ic = act.counts if split_in else balanced_counts(D, tp)[0]
                Din, Fl, Fout = ic[r], Fo, Fo
                f_ph.append(compute(f"{name}.forward", 2 * b * Din * Fo, "gemm", "forward"))
                c, ph = comm(f"{name}.forward", "allreduce", b * Fo, "tp", "forward")
                f_cc.append(c); f_ph.append(ph)
                post = []
                if in_grad and not split_in:
                    c, ph = comm(f"{name}.backward", "allgather", b * Din, "tp", "backward",
                                 "allgatherv", b * D * s)
                    b_cc.append(c); post.append(ph)
                new = _Act((Fo,))
            else:
                Din, Fl, Fout = D, Fo, Fo
                f_ph.append(compute(f"{name}.forward", 2 * b * D * Fo, "gemm", "forward"))
                post = []
                new = _Act((Fo,))
            if bias:
                f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fl * s, "forward"))
            # as Linear.backward: db, dW in row blocks (a bucket may start after each), dx
            if bias:
                b_ph.append(elem(f"{name}.backward.db", _PASSES["bias_bwd"] * b * Fl * s, "backward"))
            w_at = len(b_ph)
            b_ph.append(compute(f"{name}.backward", 2 * b * Din * Fl, "gemm", "backward"))
            if in_grad:
                b_ph.append(compute(f"{name}.backward.dx", 2 * b * Din * Fl, "gemm", "backward"))
            b_ph += post
            lp = [Fl * Din] + ([Fl] if bias else [])
            rows = [Fl] * len(lp)
            keep += b * Din * s
            act = new

        elif t == "conv2d":
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            K = int(spec["out"])
            R, S_ = F._pair(spec["kernel"])
            st, dl = F._pair(spec.get("stride", 1)), F._pair(spec.get("dilation", 1))
            (pt, pb), (pl, pr) = F.normalize_padding(spec.get("padding", 0))
            Ho = F.conv_output_size(H, R, st[0], pt, pb, dl[0])
            Wo = F.conv_output_size(W, S_, st[1], pl, pr, dl[1])
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for kernel {R}x{S_}")
            bias = bool(spec.get("bias", True))
            post = []
            if sh == "out":
                oc = balanced_counts(K, tp)[0]
                Cl, Kl = C, oc[r]
                keep_split = _keeps_split(layers, i, tp)
                f = 2 * b * Kl * Ho * Wo * C * R * S_
                f_ph.append(compute(f"{name}.forward", f, "conv", "forward"))
                if not keep_split:
                    c, ph = comm(f"{name}.forward", "allgather", b * Kl * Ho * Wo, "tp", "forward",
                                 "allgatherv", b * K * Ho * Wo * s)
                    f_cc.append(c); f_ph.append(ph)
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", b * C * H * W, "tp", "backward")
                    b_cc.append(c); post.append(ph)
                new = _Act((K, Ho, Wo), tuple(oc) if keep_split else None)
            elif sh == "in":
                split_in = act.counts is not None
                ic = act.counts if split_in else balanced_counts(C, tp)[0]
                Cl, Kl = ic[r], K
                f = 2 * b * K * Ho * Wo * Cl * R * S_
                f_ph.append(compute(f"{name}.forward", f, "conv", "forward"))
                c, ph = comm(f"{name}.forward", "allreduce", b * K * Ho * Wo, "tp", "forward")
                f_cc.append(c); f_ph.append(ph)
                if in_grad and not split_in:
                    c, ph = comm(f"{name}.backward", "allgather", b * Cl * H * W, "tp", "backward",
                                 "allgatherv", b * C * H * W * s)
                    b_cc.append(c); post.append(ph)
                new = _Act((K, Ho, Wo))
            else:
                Cl, Kl = C, K
                f = 2 * b * K * Ho * Wo * C * R * S_
                f_ph.append(compute(f"{name}.forward", f, "conv", "forward"))
                new = _Act((K, Ho, Wo))
            b_ph.append(compute(f"{name}.backward", f * (2 if in_grad else 1), "conv", "backward"))
            # beside its GEMMs (the conv rate, measured on the forward, covers im2col):
            # dy to (K, M) layout, and with the input gradient col2im's strided adds
            col = Cl * R * S_ * b * Ho * Wo
            b_ph.append(elem(f"{name}.backward.layout",
                             (2 * b * Kl * Ho * Wo + (2 * col + 2 * b * Cl * H * W if in_grad else 0))
                             * s, "backward"))
            b_ph += post
            lp = [Kl * Cl * R * S_] + ([Kl] if bias else [])
            rows = [Kl] * len(lp)
            keep += Cl * R * S_ * b * Ho * Wo * s        # the im2col columns
            act = new

        elif t in NORMS:
            if len(act.shape) != (3 if t == "batchnorm2d" else 1):
                raise WorkloadError(f"{where}: input {act.shape} does not fit {t}")
            c_loc = xl[0]
            f_ph.append(elem(f"{name}.forward", _PASSES["bn_fwd"] * n_in * s, "forward"))
            b_ph.append(elem(f"{name}.backward", _PASSES["bn_bwd"] * n_in * s, "backward"))
            if dp > 1:       # SyncBatchNorm over the data group
                c, ph = comm(f"{name}.forward", "allreduce", 2 * c_loc + 2, "dp", "forward")
                f_cc.append(c); f_ph.insert(1, ph)
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", 2 * c_loc, "dp", "backward")
                    b_cc.append(c); b_ph.insert(1, ph)
            lp = [c_loc, c_loc]
            keep += n_in * s

        elif t in ELEMENTWISE:
            k = "relu" if t == "relu" else ("dropout" if t == "dropout" else "act")
            f_ph.append(elem(f"{name}.forward", _PASSES[f"{k}_fwd"] * n_in * s, "forward"))
            b_ph.append(elem(f"{name}.backward", _PASSES[f"{k}_bwd"] * n_in * s, "backward"))
            keep += n_in * (1 if t in ("relu", "dropout", "leakyrelu") else s)

        elif t in POOLS:
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            R, S_ = F._pair(spec["kernel"])
            st = F._pair(spec.get("stride", (R, S_)))
            (pt, pb), (pl, pr) = F.normalize_padding(spec.get("padding", 0))
            Ho = F.conv_output_size(H, R, st[0], pt, pb)
            Wo = F.conv_output_size(W, S_, st[1], pl, pr)
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for pool {R}x{S_}")
            out_n = b * xl[0] * Ho * Wo
            f_ph.append(elem(f"{name}.forward", _PASSES["pool_fwd"] * R * S_ * out_n * s, "forward"))
            b_ph.append(elem(f"{name}.backward",
                             _PASSES["pool_bwd"] * R * S_ * out_n * s + 3 * n_in * s, "backward"))
            keep += out_n
            act = _Act((C, Ho, Wo), act.counts)

        elif t == "globalavgpool2d":
            f_ph.append(elem(f"{name}.forward", n_in * s, "forward"))
            b_ph.append(elem(f"{name}.backward", n_in * s, "backward"))
            act = _Act((act.shape[0],), act.counts)

        else:   # flatten: (c_r, H, W) -> c_r*H*W features, channel-major
            per = _prod(act.shape[1:])
            act = _Act((_prod(act.shape),),
                       None if act.counts is None else tuple(c * per for c in act.counts))

        fwd_ph += f_ph
        fwd_cc += f_cc
        if i >= first_param:
            blocks.append((b_ph, b_cc, lp, rows or list(lp), w_at))
        param_sizes += lp
        peak = max(peak, b * _prod(act.local(r)) * s)

    # ---- loss: class-parallel on split logits, else local (no message) ----
    if len(act.shape) != 1:
        raise WorkloadError(f"the model's output {act.shape} is not a vector of class scores")
    Ql = act.local(r)[0]
    loss_cc: list[Collective] = []
    loss_ph = [elem("loss.forward", _PASSES["loss_fwd"] * b * Ql * s, "forward")]
    if act.counts is not None:
        for count in (b, 2 * b):
            c, ph = comm("loss.forward", "allreduce", count, "tp", "forward")
            loss_cc.append(c); loss_ph.append(ph)
    if accuracy:
        loss_ph.append(elem("loss.metrics", _PASSES["metrics"] * b * Ql * s, "forward"))
        if act.counts is not None:
            c, ph = comm("loss.metrics", "allreduce", b, "tp", "forward", itemsize=8)
            loss_cc.append(c); loss_ph.append(ph)
    loss_ph.append(elem("loss.backward", _PASSES["loss_bwd"] * b * Ql * s, "backward"))

    # ---- backward, launching data-parallel buckets (mpifc.parallel.data.plan_buckets) ----
    params = sum(param_sizes)
    if cap > 0 and min_buckets > 1:
        cap = max(1, min(cap, -(-params * s // int(min_buckets))))
    rev = [(li, j, n, blocks[li][3][j]) for li in range(len(blocks))
           for j, n in enumerate(blocks[li][2])][::-1]
    groups: list[list] = []          # per bucket: pieces (li, j, r0, r1, elements per row)
    cur: list = []
    cur_b = 0
    for li, j, n, R in rev:
        row_n = n // R if R else 0
        if cap <= 0 or row_n == 0:                   # whole (own bucket, or empty)
            if cap <= 0 and cur:
                groups.append(cur); cur, cur_b = [], 0
            cur.append((li, j, 0, R, row_n))
            if cap <= 0:
                groups.append(cur); cur, cur_b = [], 0
            continue
        r0 = 0
        while r0 < R:
            take = min(R - r0, (cap - cur_b) // (row_n * s))
            if take <= 0:
                if cur:
                    groups.append(cur); cur, cur_b = [], 0
                    continue
                take = 1                             # one row larger than the cap
            cur.append((li, j, r0, r0 + take, row_n))
            cur_b += take * row_n * s
            r0 += take
    if cur:
        groups.append(cur)
    numel = [sum((r1 - r0) * rn for _, _, r0, r1, rn in g) for g in groups]
    pending = [len(g) for g in groups]
    pieces: dict[tuple, list] = {}   # (li, j) -> [(bucket, r0, r1)] in row order
    for k, g in enumerate(groups):
        for li, j, r0, r1, _ in g:
            pieces.setdefault((li, j), []).append((k, r0, r1))
    dp_cc: list[Collective] = []
    dp_ph: list[Phase] = []
    bwd_ph: list[Phase] = []
    bwd_cc: list[Collective] = []

    def piece_done(k):
        """A piece of bucket k is final: start the bucket once all its pieces are."""
        pending[k] -= 1
        if pending[k] or not numel[k] or dp == 1:
            return
        c = Collective(f"dp.grad_bucket{k}", "iallreduce" if overlap else "allreduce",
                       "dp", numel[k], s)
        dp_cc.append(c)
        ph = Phase("comm", f"dp.grad_bucket{k}.allreduce", op="allreduce", group="dp",
                   bytes=float(c.bytes), overlappable=overlap, stage="backward")
        (bwd_ph if overlap else dp_ph).append(ph)

    for li in reversed(range(len(blocks))):
        ph_list, cc, lp, rows, w_at = blocks[li]
        bwd_cc += cc
        if w_at is None:
            bwd_ph += ph_list
        else:
            # a linear layer (Parameter.accumulate_rows): db, then dW a row block per
            # piece, each piece final after its block, then dx and the rest
            bwd_ph += ph_list[:w_at]
            for j in reversed(range(1, len(lp))):
                for k, _, _ in pieces.pop((li, j)):
                    piece_done(k)
            w = ph_list[w_at]
            for k, r0, r1 in pieces.pop((li, 0)):
                bwd_ph.append(Phase("compute", w.label, flops=w.flops * (r1 - r0) / max(rows[0], 1),
                                    op_kind=w.op_kind, stage=w.stage))
                piece_done(k)
            bwd_ph += ph_list[w_at + 1:]
        # the layer's gradients are final: the rest of its pieces, in buffer order
        # (parameters reversed, rows ascending: DataParallel._layer_done)
        for j in reversed(range(len(lp))):
            for k, _, _ in pieces.pop((li, j), []):
                piece_done(k)
    if not overlap:      # the blocking mode reduces every bucket after backward, in order
        order = sorted(range(len(dp_cc)), key=lambda i: int(dp_cc[i].phase[len("dp.grad_bucket"):]))
        dp_cc, dp_ph = [dp_cc[i] for i in order], [dp_ph[i] for i in order]

    # ---- clipping and optimizer (element-wise over the local parameters) ----
    o = cfg["optim"]
    opt_ph: list[Phase] = []
    clip_cc: list[Collective] = []
    if o.get("clip_norm"):
        opt_ph.append(elem("clip.norm", 2 * params * s, "optimizer"))
        if tp > 1:
            c, ph = comm("clip.norm", "allreduce", 1, "tp", "optimizer", itemsize=8)
            clip_cc.append(c); opt_ph.append(ph)
            opt_ph.append(elem("clip.scale", 2 * params * s, "optimizer"))
    if o["name"] == "sgd":
        passes = _PASSES["sgd_wd"] if o.get("weight_decay") else _PASSES["sgd"]
        slots = 1 if o.get("momentum") else 0
    else:
        passes, slots = _PASSES["adam"], 2
    opt_ph.append(elem("optimizer.step", passes * params * s, "optimizer"))

    # ---- the trainer around the step: data in scatter mode, the finite-loss check ----
    data_cc: list[Collective] = []
    data_ph: list[Phase] = []
    if cfg.get("data", {}).get("mode") == "scatter":
        # root reads the global batch and scatters rows over dp: images stored as uint8
        x_item = 1 if len(cfg["model"]["input"]) == 3 else s
        for count, item in ((b * _prod(cfg["model"]["input"]), x_item), (b, 8)):
            c, ph = comm("", "scatter", count, "dp", "forward", "scatterv", count * item * dp,
                         itemsize=item)
            data_cc.append(c); data_ph.append(ph)
    if finite_check:
        c, ph = comm("check.finite", "allreduce", 1, "world", "optimizer", itemsize=8)
        clip_cc.append(c); opt_ph.append(ph)

    phases = data_ph + fwd_ph + loss_ph + bwd_ph + dp_ph + opt_ph
    # trace order: a non-blocking bucket is recorded at its wait, after the backward
    collectives = data_cc + fwd_cc + loss_cc + bwd_cc + dp_cc + clip_cc
    memory = {
        "parameters": params * s,
        "gradients": params * s,       # the bucket buffers themselves (grads are views)
        "optimizer": slots * params * s,
        "activations": keep + 2 * peak,
    }
    wl = Workload(name=f"{cfg.get('name', 'model')} dp={dp} tp={tp} batch={B}", phases=phases,
                  samples_per_step=B, memory_bytes_per_rank=float(sum(memory.values())),
                  dp=dp, tp=tp)
    return StepDescription(collectives, wl, params, memory, names)


def config_workload(cfg: dict, dp: int, tp: int, **kw) -> Workload:
    """The engine :class:`Workload` of :func:`describe_step` (slowest rank: dp/tp rank 0)."""
    return describe_step(cfg, dp, tp, **kw).workload


def workload_builder(cfg: dict, **kw):
    """``build(dp, tp) -> Workload`` for :func:`mpifc.sim.planner.workload_cost`."""
    def build(dp: int, tp: int) -> Workload:
        return config_workload(cfg, dp, tp, **kw)
    return build
