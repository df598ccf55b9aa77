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
    vocab EmbeddingBag fwd allreduce of (b, D) bag sums   (text; bwd: none, rows stay local)
    class-split logits   fwd allreduce max (b), allreduce sums (2b); accuracy: allreduce
                         min (b, int64); whole logits: a local loss, no message
    data parallel     iallreduce over dp of each gradient bucket (reverse parameter
                      order, filled to bucket_mb MiB or total/min_buckets (>= 1 MiB), a parameter
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

A residual block is walked as its body's layers, then its projection's (from the
same input), then the add; its backward runs the projection's layers, the body's,
then the add of the two input gradients. Its input and its branches' outputs are
whole (a producer before a block, a layernorm, or at a branch's end gathers).
DataParallel marks the block's conv/norm gradients final when the whole block is
done (a linear layer's dW row blocks still start their buckets as they come).

Compute: GEMM and convolution FLOPs (2 per multiply-add, the layers' own ``flops``);
element-wise work as bytes moved (reads + writes) counted from the NumPy code of
each layer (see ``_PASSES``), since those kernels are memory-bound.

Memory per rank: parameters + gradients (the bucket buffers) + optimizer slots +
what the forward keeps for the backward (StepDescription.kept: layer inputs by
reference -- no im2col columns, no normalised copy --, 1-byte masks, uint8 argmax
offsets) + twice the largest live activation + the kernels' reusable scratch (conv
column / dcol / per-image dW blocks per geometry, a BatchNorm block).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpifc.comm.counts import balanced_counts
from mpifc.errors import UserError
from mpifc.nn import blockpool, hostjit
from mpifc.nn import functional as F
from mpifc.nn.im2col import COL_BLOCK_BYTES, ConvPlan, col2im_jit
from mpifc.optim.optimizer import CHUNK_ELEMENTS
from mpifc.parallel.data import bucket_cap, default_min_buckets
from mpifc.parallel.describe import Collective
from mpifc.sim.engine import Phase, Workload
from mpifc.sim.planner import LayoutInfeasible

# Element-wise work is priced from what the NumPy code does (mpifc.nn.functional,
# mpifc.nn, mpifc.parallel, mpifc.optim, DataParallel and the trainer's step): bytes
# moved (reads + writes), calls (each NumPy operation, and one per layer method the
# step dispatches to) and rows (innermost rows of a strided pass). ``_PASSES`` are bytes
# per element in units of the itemsize s; ``_CALLS`` are the calls of one kernel.
_PASSES = {
    "bias_fwd": 2, "bias_bwd": 1,            # y += b ; db = dy.sum(0)
    "relu_fwd": 3.25, "relu_bwd": 2.25,      # max(x,0), mask=y>0 (1 byte) ; dy*mask
    "act_fwd": 6, "act_bwd": 8,              # tanh / sigmoid / gelu / leaky: a few passes
    # per block of samples, through a cache-resident scratch d (functional._bn_blocks):
    # stats d = x-k (2), einsum sum (1), einsum dot (2); normalise d = x-k (2), y = d*a
    # (2), y += c (2) ; backward stats d = x-k (2), einsum dy (1), einsum dy.d (2); dx:
    # d = x-k (2), d *= e (2), dx = dy*a (2), dx -= d (3), dx += f (2)
    # Of these, the passes over whole tensors in main memory: x read by the stats and
    # by the normalise loop, y written (y += c finds its block in cache) ; x and dy
    # read by the stats loop and again by the dx loop, dx written
    "bn_fwd": 11, "bn_bwd": 16, "bn_fwd_io": 3, "bn_bwd_io": 5,
    "ln_fwd": 11, "ln_bwd": 20,
    "loss_fwd": 7, "loss_bwd": 5, "metrics": 3,
    "grad_acc": 2,                           # grad[...] = g after zero_grad (read g, write)
}
# A linear layer writes its dW / db blocks straight into the gradient buffer after
# zero_grad (Parameter.grad_zero: the GEMM's own output, no += pass); one call remains
# per block, the row-block callback. Conv and norm layers assign theirs (add_grad,
# grad_acc). zero_grad itself writes nothing: its zeros are deferred until read, and
# every layer's first gradient overwrites them (Parameter.zero_grad).
_CALLS = {
    "linear_fwd": 2, "linear_dw": 3, "linear_dx": 1, "gemm": 2,
    "bias_fwd": 1, "bias_bwd": 4, "grad_acc": 2,      # += and the row-block callback
    "grad_write": 1,                                  # the row-block callback
    "relu_fwd": 3, "relu_bwd": 2,                     # with the layer dispatch
    "act_fwd": {"leakyrelu": 4, "gelu": 9, "tanh": 2, "sigmoid": 4},
    "act_bwd": {"leakyrelu": 3, "gelu": 11, "tanh": 4, "sigmoid": 4},
    # BatchNorm: calls outside the block loop (shift, per-channel float64 coefficients,
    # running statistics, workspace and share set-up) and calls per block of samples
    "bn_fwd": 50, "bn_bwd": 50, "bn_fwd_block": 8, "bn_bwd_block": 10,
    "bn_sync_fwd": 6, "bn_sync_bwd": 4,
    "flatten": 2,
    "loss_fwd": 24, "loss_bwd": 10, "metrics": 5,
    "ploss_fwd": 20, "ploss_bwd": 8, "pmetrics": 10,
    "bucket_post": 4,                        # trace phase, iallreduce, progress thread
    "step": 12,                              # the trainer's step around the layers
}
# The compiled kernels (mpifc.nn.hostjit, the ``fast`` extra) make one pass over memory
# per kernel and no NumPy call inside it: BatchNorm of rows >= F.BN_JIT_MIN_ROW reads x
# for its sums and again to write y (backward: x and dy for the sums, x and dy again to
# write dx: the same main-memory passes as the NumPy code's "io", no block passes);
# ReLU reads x, writes y and the 1-byte mask (backward: dy and the mask, writes dx);
# tiled max pooling reads x and writes y and the 1-byte offset (backward: dy and the
# offset, writes dx). Calls: each kernel's dispatch (Numba types its arguments; with
# hostjit.kernels about 5 us here, 7 NumPy calls of call_s 0.7 us) and the NumPy calls
# around it. Rows: the kernels loop over (sample, channel) rows (BatchNorm) or output
# rows (max pool); each costs a few ns beside its bytes -- per row here about 9 ns for
# the forward pair of BatchNorm kernels, 11 for the backward pair, 10 for max pool
# either way: in units of calibrate's row_s (3.5 ns here) the factors below.
_JIT_CALLS = {"bn_fwd": 14, "bn_bwd": 14, "relu": 10, "pool": 10, "sgd": 14}
_JIT_ROWS = {"bn_fwd": 2.5, "bn_bwd": 3.0, "pool": 3.0}


def _pad_cost(N, C, H, W, pads, s):
    """(bytes, calls, rows) of functional._pad: fill the border, copy the interior."""
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return 0.0, 0, 0
    Hp, Wp = H + t + b, W + l + r
    sides = sum(1 for v in (t, b, l, r) if v)
    return float((2 * N * C * H * W + N * C * (Hp * Wp - H * W)) * s), 2 + sides, N * C * H


def conv_plan(C, H, W, R, S, Ho, Wo, pads, stride=1, dilation=1) -> ConvPlan:
    """The kernel's own geometry (:class:`mpifc.nn.im2col.ConvPlan`: per kernel offset,
    the output rectangle whose input pixels lie inside the image); no array is built."""
    return ConvPlan((1, C, H, W), R, S, F._pair(stride), pads, F._pair(dilation), Ho, Wo)


def conv_blocks(N, plan: ConvPlan, s) -> tuple[int, int]:
    """(images per block, blocks) of conv2d_forward/backward on the host: a block's
    columns fit COL_BLOCK_BYTES (ConvPlan.block)."""
    per_image = plan.C * plan.R * plan.S * plan.Ho * plan.Wo * s
    n = max(1, min(N, COL_BLOCK_BYTES // max(per_image, 1)))
    return n, -(-N // n) if N else 0


def im2col_cost(N, C, H, W, R, S, Ho, Wo, pads, s, stride=1, dilation=1):
    """(bytes, calls, rows) of unfolding N images a block at a time (im2col_block) into
    the reused column buffer: per block, one strided copy per kernel offset of the
    output rectangle whose input lies inside the image (the padded margins of the
    buffer stay zero from its first use: no pad pass, no zero fill per step); rows of
    that rectangle's width. A 1x1 stride-1 unpadded conv unfolds nothing (x is the
    columns)."""
    plan = conv_plan(C, H, W, R, S, Ho, Wo, pads, stride, dilation)
    if plan.identity:
        return 0.0, 0, 0
    _, blocks = conv_blocks(N, plan, s)
    if plan.flat is not None:
        # 'same' conv: per offset one copy of a shifted plane (a row per image and
        # channel), then the padding columns zeroed again (a row per image and channel)
        copied = sum(f[3] - f[2] for f in plan.flat)
        zeros = sum((c.stop - c.start) * Ho for f in plan.flat for c in f[4])
        n_zero = sum(len(f[4]) for f in plan.flat)
        return (N * C * (2.0 * copied + zeros) * s, blocks * (len(plan.flat) + n_zero),
                N * C * (len(plan.flat) + n_zero))
    area = sum((o[3] - o[2]) * (o[5] - o[4]) for o in plan.offsets)
    rows = sum(o[3] - o[2] for o in plan.offsets)
    return 2.0 * N * C * area * s, blocks * len(plan.offsets), N * C * rows


def col2im_cost(N, C, H, W, R, S, Ho, Wo, pads, s, stride=1, dilation=1, jit=False):
    """(bytes, calls, rows) of folding dcol back into dx a block at a time
    (col2im_block): an offset that reads every input pixel once (the centre of a
    stride-1 'same' conv) assigns dx first (a copy), else dx is zero-filled; every
    other offset adds its rectangle into dx with a strided += (reads both, writes dx).
    Nothing is padded or cropped. A 1x1 stride-1 unpadded conv folds nothing (its
    dcol GEMM writes dx).

    Rows count once per strided operand of a ufunc pass (NumPy restarts the inner
    loop of each; calibrate's row_s is measured with one): a += into a strided view of
    dx from a strided view of dcol has three (dx read, dcol read, dx written) -- 92 us
    for 6144 rows of 3 here against 29 us for the strided copy that im2col makes. A
    copy is one pass whatever its operands.

    ``jit``: the compiled kernels (mpifc.nn.hostjit): a 'same' conv's ``col2im_flat``
    (per image and channel dx zeroed, dcol's padding columns zeroed, every offset
    added, the centre too), any other geometry's ``col2im_offsets`` (dx zeroed, every
    offset's rectangle added); one call per block, no NumPy rows; from
    im2col.JIT_MIN_PLANE input pixels per plane (smaller planes stay NumPy)."""
    plan = conv_plan(C, H, W, R, S, Ho, Wo, pads, stride, dilation)
    if plan.identity:
        return 0.0, 0, 0
    _, blocks = conv_blocks(N, plan, s)
    jit = jit and col2im_jit(plan)          # NumPy below JIT_MIN_PLANE pixels
    if plan.flat is not None and jit:
        zeros = sum((c.stop - c.start) * Ho for f in plan.flat for c in f[4])
        added = sum(f[3] - f[2] for f in plan.flat)
        return N * C * (zeros + H * W + 3.0 * added) * s, blocks, 0
    if jit:              # col2im_offsets: dx zeroed, every offset's rectangle added
        area = sum((o[3] - o[2]) * (o[5] - o[4]) for o in plan.offsets)
        return N * C * (H * W + 3.0 * area) * s, blocks, 0
    if plan.flat is not None:
        # 'same' conv (im2col._col2im_flat): zero dcol's padding columns, assign the
        # centre offset (or zero-fill), then one shifted += per other offset over the
        # flattened planes: three strided operands, a row each per image and channel
        L = H * W
        zeros = sum((c.stop - c.start) * Ho for f in plan.flat for c in f[4])
        n_zero = sum(len(f[4]) for f in plan.flat)
        full = [f for f in plan.flat if f[1:4] == (0, 0, L)]
        rest = [f for f in plan.flat if not full or f is not full[0]]
        added = sum(f[3] - f[2] for f in rest)
        nbytes = N * C * (zeros + (2.0 if full else 1.0) * L + 3.0 * added) * s
        return (nbytes, blocks * (n_zero + 1 + len(rest)),
                N * C * (n_zero + (1 if full else 0) + 3 * len(rest)))
    offs = plan.offsets
    full = [o for o in offs if o[6].step == 1 and o[7].step == 1
            and (o[3] - o[2], o[5] - o[4]) == (H, W)]
    first = (2.0 if full else 1.0) * N * C * H * W * s
    rest = [o for o in offs if not full or o is not full[0]]
    area = sum((o[3] - o[2]) * (o[5] - o[4]) for o in rest)
    rows = 3 * N * C * sum(o[3] - o[2] for o in rest) + (N * C if full else 0)
    return first + 3.0 * N * C * area * s, blocks * (1 + len(rest)), rows


def maxpool_cost(N, C, H, W, R, S, sh, sw, pads, Ho, Wo, s):
    """((fwd bytes, calls, rows), (bwd bytes, calls, rows)) of maxpool2d_forward/backward.

    Windows that tile the input (stride == kernel, no padding: functional._maxpool_tiles)
    reduce in two stages: stage 1 over the S columns of each window row on the
    (N, C, Ho*R, Wo) strided views (compare 2s+1, maximum 3s; from the third column on,
    the uint8 column index updated without a branch: subtract 2, *= 3, += 3), stage 2
    over the R row maxima on (N, C, Ho, Wo) (compare, the row's column index + r*S 2,
    subtract 3, *= 3, + 3, maximum 3s). Other windows: pad with -inf, copy the first
    window, then per further offset compare, the branch-free index update (8) and
    maximum. The argmax offset is uint8 (int32 from 256 window positions).
    Backward: per offset ``idx == k`` (read idx, write the mask) and ``dy * mask`` into
    the strided window (or into a temporary that += adds when windows overlap); dx
    is zero-filled unless the windows cover it exactly; a padded input is cropped with
    a copy.
    """
    out, n_in = N * C * Ho * Wo, N * C * H * W
    rows = N * C * Ho
    k = R * S
    idx = 1 if k < 256 else 4
    (t, b), (l, r) = pads
    padded = bool(t or b or l or r)
    tiled = F._maxpool_tiles(R, S, sh, sw, pads)
    pool_blocks = elementwise_blocks(N, C * H * W * s)
    if tiled:
        e1 = N * C * Ho * R * Wo                  # stage 1 elements (window rows)
        fb = (S - 1) * e1 * (5.0 * s + 1) + max(S - 2, 0) * 8.0 * e1 + (e1 if S == 1 else 0)
        fb += (R - 1) * out * (5.0 * s + 12)
        fc = 6 + 2 * (S - 1) + 3 * max(S - 2, 0) + 6 * (R - 1) + (1 if S == 1 else 0)
        # rows: once per strided operand whose rows are not contiguous with each
        # other (see col2im_cost). Stage 1's column views x[..., s::S] merge H and W
        # into one strided run when the windows cover W (a row per (n, c)), else a
        # row per window row; its first column compares and takes the maximum of two
        # such views (4), later ones of one (2). Stage 2's row views have rows of Wo
        # elements; its first row has y and idx strided too (7: compare 2, index + 1,
        # subtract 1, + 1, maximum 2), later rows 3
        r1 = N * C if Wo * S == W else N * C * Ho * R
        fr = (min(S - 1, 1) * 4 + max(S - 2, 0) * 2) * r1
        fr += (min(R - 1, 1) * 7 + max(R - 2, 0) * 3) * rows
        # each block's y and idx are copied into the outputs (2 passes, strided rows),
        # and the whole stage set runs once per block (blockpool.for_each_block)
        fb += out * (2.0 * s + 2)
        fr += 2 * rows
        fwd = (fb, (fc + 2) * pool_blocks, fr)
    else:
        pb, pc, pr = _pad_cost(N, C, H, W, pads, s)
        fwd = (pb + out * idx + 2.0 * out * s + (k - 1) * out * (5.0 * s + 9),
               pc + 4 + 2 * k + 5 * (k - 1), pr + rows * (1 + 2 * (k - 1)))
    overlap = sh < R or sw < S
    # idx == k (read idx, write the mask), then dy * mask: into the window (read dy and
    # the mask, write dx) or, overlapping, into a temporary that += adds (3 s more)
    per_out = idx + 2 + (5 * s if overlap else 2 * s)
    Hp, Wp = H + t + b, W + l + r
    covered = not padded and (sh, sw) == (R, S) and (Ho * R, Wo * S) == (H, W)
    per_block = (4 if overlap else 3) * k
    bwd = ((0 if covered else N * C * Hp * Wp * s) + k * out * per_out
           + (2.0 * n_in * s if padded else 0),
           3 + per_block * (1 if overlap else pool_blocks) + (1 if padded else 0),
           k * rows + (N * C * H if padded else 0))
    return fwd, bwd


def elementwise_blocks(N, sample_bytes):
    """Blocks of :func:`mpifc.nn.blockpool.for_each_block` over N samples (one thread)."""
    per = max(1, blockpool.BLOCK_BYTES // max(int(sample_bytes), 1))
    return max(1, -(-N // per))


def avgpool_cost(N, C, H, W, R, S, sh, sw, pads, Ho, Wo, s):
    """As :func:`maxpool_cost` for avgpool2d: a strided copy, then a strided add per
    offset, a scale; backward scales dy, zeroes dx and adds it back per offset."""
    out, n_in = N * C * Ho * Wo, N * C * H * W
    rows = N * C * Ho
    k = R * S
    pb, pc, pr = _pad_cost(N, C, H, W, pads, s)
    (t, b), (l, r) = pads
    padded = bool(t or b or l or r)
    Hp, Wp = H + t + b, W + l + r
    fwd = (pb + 2.0 * out * s + (k - 1) * 3.0 * out * s + 2.0 * out * s,
           pc + 5 + 2 * k, pr + rows * k)
    bwd = (2.0 * out * s + N * C * Hp * Wp * s + k * 3.0 * out * s
           + (2.0 * n_in * s if padded else 0), 5 + 2 * k + (1 if padded else 0),
           k * rows + (N * C * H if padded else 0))
    return fwd, bwd


def optimizer_cost(o: dict, jit: bool = False) -> tuple[float, int, int]:
    """(bytes per parameter element in units of s, calls per parameter tensor, state
    slots) of one optimizer step (mpifc.optim), as the trainer builds it. ``jit``: the
    compiled kernel (one pass: p and g read, p written; each state slot read and
    written; a kernel dispatch and the calls around it)."""
    wd = bool(o.get("weight_decay"))
    if o["name"] == "sgd" and jit:
        mom = bool(o.get("momentum"))
        return 3 + (2 if mom else 0), _JIT_CALLS["sgd"], (1 if mom else 0)
    if jit:              # Adam / AdamW compiled: p, g, m, v read; p, m, v written
        return 7, _JIT_CALLS["sgd"], 2
    if o["name"] == "sgd":
        mom = bool(o.get("momentum"))
        # g = grad + wd*p ; b *= m ; b += g ; p -= lr*g ; plus the method's own calls
        return 5 + (5 if mom else 0) + (5 if wd else 0), 5 + (2 if mom else 0) + (2 if wd else 0), \
            (1 if mom else 0)
    # m *= b1 ; m += (1-b1) g ; v *= b2 ; v += (1-b2) g*g ; sqrt ; * ; += eps ; m/denom ;
    # lr/bc1 * ; p -= ; plus _update, two _slot lookups and the backend lookup
    decoupled = o["name"] == "adamw"
    extra = (2, 1) if (wd and decoupled) else (5, 2) if wd else (0, 0)
    return 31 + extra[0], 16 + extra[1], 2


def optimizer_chunk_calls(o: dict, jit: bool = False) -> int:
    """NumPy calls per further chunk of a parameter (:func:`mpifc.optim.optimizer.flat_chunks`:
    SGD updates a tensor CHUNK_ELEMENTS at a time); 0 for an optimizer that does not
    (the compiled SGD, ``jit``, is one call per tensor)."""
    if o["name"] != "sgd" or jit:
        return 0
    return 3 + (3 if o.get("momentum") else 0) + (2 if o.get("weight_decay") else 0)


ELEMENTWISE = {"relu", "leakyrelu", "gelu", "tanh", "sigmoid", "dropout"}
POOLS = {"maxpool2d", "avgpool2d"}
NORMS = {"batchnorm2d", "batchnorm1d"}
# child-name prefixes of mpifc.models (numbered per prefix: conv1, bn1, relu1, fc1, ...)
PREFIX = {"linear": "fc", "conv2d": "conv", "batchnorm2d": "bn", "batchnorm1d": "bn",
          "relu": "relu", "leakyrelu": "relu", "gelu": "gelu", "tanh": "tanh",
          "sigmoid": "sigmoid", "maxpool2d": "pool", "avgpool2d": "pool",
          "globalavgpool2d": "pool", "flatten": "flatten", "dropout": "dropout",
          "layernorm": "ln", "residual": "res", "embeddingbag": "emb"}
_PRODUCERS = {("linear", "column"), ("conv2d", "out")}
_CONSUMERS = {("linear", "row"), ("conv2d", "in")}


class WorkloadError(UserError, ValueError):
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
    kept          bytes the forward keeps for the backward, per trace name (a residual
                  block's layers under the block's name); arrays referenced, not
                  copied, count under the layer that keeps them
    """

    collectives: list[Collective]
    workload: Workload
    params: int
    memory: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    kept: dict[str, float] = field(default_factory=dict)


def gemm_aspect(m: int, k: int, n: int) -> float:
    """min(m, k, n) / (m k n)^(1/3) of an (m x k) @ (k x n) product: 1 for a square one,
    small for a thin one (see ComputeRates.gemm_aspect_curve)."""
    m, k, n = (max(int(v), 1) for v in (m, k, n))
    return min(1.0, min(m, k, n) / (m * k * n) ** (1.0 / 3.0))


def _prod(xs) -> int:
    return int(math.prod(xs))


def _keeps_split(layers: list[dict], i: int, tp: int, at_end: bool = True) -> bool:
    """A column / out-channel layer at i keeps its output split (no allgather) when the
    next layer with GEMM parameters takes a split input, or when it is the last one
    (its output is the class-split logits; ``at_end`` False: the last of a residual
    branch, whose output is whole). A layernorm or residual block before the next
    GEMM layer makes it gather. On tp = 1 nothing is split."""
    if tp == 1:
        return False
    for spec in layers[i + 1:]:
        if spec["type"] in ("layernorm", "residual"):
            return False
        if spec["type"] in ("linear", "conv2d"):
            return (spec["type"], spec.get("shard", "none")) in _CONSUMERS
    return at_end


def _has_params(spec: dict) -> bool:
    if spec["type"] == "residual":
        return any(_has_params(s) for s in spec["layers"] + _projection(spec))
    return (spec["type"] in ("linear", "conv2d", "layernorm", "embeddingbag")
            or spec["type"] in NORMS)


# ---- residual blocks (issue 18): the table is walked as one flat list of entries ----
def _projection(spec: dict) -> list:
    p = spec.get("projection", [])
    return [p] if isinstance(p, dict) else list(p)


def _flatten(layers, path="model.layers", prefix="", depth=0) -> list[dict]:
    """The layers in forward order, a residual block as ``begin``, its body's layers,
    ``shortcut``, its projection's layers, ``end``. Names and paths as mpifc.models
    gives them (``res2.body.conv1``, ``model.layers[5].layers[0]``); ``depth`` > 0
    inside a block; a layer's ``branch``/``j``/``at_end`` locate it for _keeps_split."""
    out, counter = [], {}
    for i, spec in enumerate(layers):
        t = spec.get("type")
        if t not in PREFIX:
            raise WorkloadError(f"{path}[{i}]: unknown layer type {t!r}")
        pre = PREFIX[t]
        counter[pre] = counter.get(pre, 0) + 1
        name, where = f"{prefix}{pre}{counter[pre]}", f"{path}[{i}]"
        if t == "residual":
            ident = "projection" not in spec
            out.append(dict(kind="begin", spec=spec, path=where, name=name, depth=depth))
            out += _flatten(spec["layers"], f"{where}.layers", f"{name}.body.", depth + 1)
            out.append(dict(kind="shortcut", path=where, name=name, depth=depth))
            if not ident:
                out += _flatten(_projection(spec), f"{where}.projection", f"{name}.shortcut.",
                                depth + 1)
            out.append(dict(kind="end", path=where, name=name, depth=depth, identity=ident))
        else:
            out.append(dict(kind="layer", spec=spec, path=where, name=name, depth=depth,
                            branch=layers, j=i, at_end=depth == 0))
    return out


def describe_step(cfg: dict, dp: int, tp: int, *, global_batch: int | None = None,
                  local_batch: int | None = None, dp_rank: int = 0, tp_rank: int = 0,
                  bucket_mb: float | None = None, overlap: bool | None = None,
                  min_buckets: int | None = None, accuracy: bool = True,
                  finite_check: bool = True, kernels: str | None = None) -> StepDescription:
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
    min_buckets : DataParallel's ``min_buckets`` (the cap is at most total / min_buckets;
        default as DataParallel's: MIN_BUCKETS with overlap, 1 without)
    accuracy : the step computes accuracy (the class-parallel metrics allreduce)
    finite_check : the trainer's per-step agreement that the loss is finite (one
        allreduce max of a float64 over the world, phase "check.finite")
    kernels : ``"numba"`` or ``"numpy"``: the host kernels priced for BatchNorm, ReLU
        and max pooling (default: what this process runs, ``hostjit.active()``)

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
    if min_buckets is None:
        min_buckets = default_min_buckets(overlap)
    if kernels is None:
        kernels = hostjit.active()
    elif kernels not in ("numba", "numpy"):
        raise ValueError(f"kernels={kernels!r}: expected 'numba' or 'numpy'")
    jit = kernels == "numba"

    layers = [dict(l) for l in cfg["model"]["layers"]]
    inp = list(cfg["model"]["input"])
    text = bool(inp) and inp[0] == "tokens"      # a text model: x = (tokens, offsets)
    if text:
        from mpifc.models import TOKENS_PER_DOC

        L = int(inp[1]) if len(inp) > 1 else TOKENS_PER_DOC       # mean tokens per document
        act = _Act(())
    else:
        act = _Act(tuple(int(v) for v in inp))
    entries = _flatten(layers)
    first_param = next((i for i, e in enumerate(entries)
                        if e["kind"] == "layer" and _has_params(e["spec"])), len(entries))
    if first_param < len(entries) and entries[first_param]["depth"] > 0:
        raise WorkloadError(f"{entries[first_param]['path']}: a residual block as the model's "
                            f"first layer with parameters is not described; put a layer with "
                            f"parameters (a stem conv2d) before it")
    res_stack: list[list] = []      # open residual blocks: [input act, body act, begin's block]
    fused_relus: set[int] = set()   # entries of ReLUs fused into the BatchNorm before them
    r = tp_rank

    fwd_ph: list[Phase] = []
    fwd_cc: list[Collective] = []
    blocks: list[tuple] = []        # per layer run in backward: (phases, collectives, params,
                                    # their rows on axis 0, index of the dW-in-row-blocks phase)
    names: list[str] = []
    param_sizes: list[int] = []     # local parameter sizes, in parameters() order
    kept: dict[str, float] = {}     # bytes the forward keeps for the backward, per layer
    scratch: dict[tuple, float] = {}    # reusable kernel workspaces (per geometry)
    peak = b * _prod(act.shape) * s

    def kept_add(nbytes):
        """What the layer being walked keeps for the backward (a residual block's layers
        count under the block's name)."""
        top = name.split(".")[0]
        kept[top] = kept.get(top, 0.0) + float(nbytes)

    held: list = []

    def kept_input(nbytes):
        """The layer keeps its input activation by reference: counted once, though a
        residual block's body and projection both keep the block's input."""
        if not any(a is act for a in held):
            held.append(act)
            kept_add(nbytes)

    def comm(label, op, count, group, stage, sim_op=None, sim_bytes=None, itemsize=s):
        c = Collective(label, op, group, int(count), int(itemsize))
        ph = Phase("comm", f"{label}.{op}", op=sim_op or op, group=group,
                   bytes=float(c.bytes if sim_bytes is None else sim_bytes), stage=stage)
        return c, ph

    def compute(label, flops, kind, stage, calls=_CALLS["gemm"], dims=None):
        return Phase("compute", label, flops=float(flops), op_kind=kind, stage=stage,
                     calls=float(calls), aspect=gemm_aspect(*dims) if dims else 1.0)

    def elem(label, nbytes, stage, calls=1, rows=0, stream=False, reduce_calls=0, masked=0):
        return Phase("compute", label, bytes=float(nbytes), op_kind="elementwise", stage=stage,
                     calls=float(calls), rows=float(rows), stream=stream,
                     reduce_calls=float(reduce_calls), masked=float(masked))

    def elem3(label, cost, stage):
        return elem(label, cost[0], stage, cost[1], cost[2])

    for i, ent in enumerate(entries):
        name, kind = ent["name"], ent["kind"]
        if ent["depth"] == 0 and kind in ("layer", "begin"):
            names.append(name)
        if kind != "layer":
            # a residual block: both branches from the same input; y = body + shortcut,
            # and in backward dx = d_body + d_shortcut (after both branches, shortcut first)
            if act.counts is not None:       # planned away: producers gather before/at its end
                raise WorkloadError(f"{ent['path']} (residual): a split activation at its {kind}")
            if kind == "begin":
                # (a block before the first layer with parameters runs no backward)
                res_stack.append([act, None, len(blocks) if i > first_param else None])
                if i > first_param:
                    blocks.append(([], [], [], [], None, ent["depth"] > 0,
                                   [] if ent["depth"] == 0 else None))
            elif kind == "shortcut":
                res_stack[-1][1] = act
                act = res_stack[-1][0]
            else:
                x_act, body_act, at = res_stack.pop()
                if act.shape != body_act.shape:
                    raise WorkloadError(f"{ent['path']} (residual): body output {body_act.shape} "
                                        f"!= shortcut output {act.shape}")
                n_out = b * _prod(act.local(r))
                fwd_ph.append(elem(f"{name}.forward", 3 * n_out * s, "forward", 1))
                if at is not None:
                    blocks[at][0].append(elem(f"{name}.backward", 3 * n_out * s, "backward", 1))
                    if blocks[at][6] is not None:     # a model-level block: DataParallel marks
                        blocks[at][6].extend(range(at + 1, len(blocks)))  # its layers done here
                act = _Act(body_act.shape, body_act.counts)     # the sum: a new array
            continue
        spec = ent["spec"]
        t = spec["type"]
        sh = spec.get("shard", "none") if tp > 1 else "none"
        where = f"{ent['path']} ({t}{', shard ' + sh if sh != 'none' else ''})"
        in_grad = i > first_param
        xl = act.local(r)
        n_in = b * _prod(xl)
        f_ph, f_cc, b_ph, b_cc, lp = [], [], [], [], []
        rows, w_at = None, None         # rows of lp (default: 1-d), phase of dW in row blocks
        if t in ("linear", "conv2d") and act.counts is not None and (t, sh) not in _CONSUMERS:
            raise WorkloadError(f"{where} gets a split input")

        if t == "embeddingbag":
            # ---- embedding bag (issue 13): a text model's first layer ----
            if i != 0 or not text:
                raise WorkloadError(f"{where}: an embeddingbag must be the first layer of a model "
                                    "with input = [\"tokens\"]")
            V, Dm = int(spec["vocab"]), int(spec["dim"])
            Vl = balanced_counts(V, tp)[0][r] if sh == "vocab" else V
            tok = b * L * Vl / V          # tokens in this rank's rows (uniform ids)
            mean = spec.get("mode", "mean") == "mean"
            # gather E[rows] (read + write), scale (mean), add.at into y (read + write);
            # searchsorted / masks over the b * L ids (int64)
            f_ph.append(elem(f"{name}.forward", (4 + (2 if mean else 0)) * tok * Dm * s
                             + 4 * 8 * b * L + 2 * b * Dm * s, "forward", 14 + (2 if mean else 0),
                             b))
            if sh == "vocab":
                c, ph = comm(f"{name}.forward", "allreduce", b * Dm, "tp", "forward")
                f_cc.append(c); f_ph.append(ph)
            # dE zeros, dy[bag] (read + write), scale, add.at into dE; add_grad (grad_acc)
            b_ph.append(elem(f"{name}.backward", Vl * Dm * s + (4 + (2 if mean else 0)) * tok * Dm * s,
                             "backward", 5 + (1 if mean else 0), b))
            b_ph.append(elem(f"{name}.backward.grad_acc", _PASSES["grad_acc"] * Vl * Dm * s,
                             "backward", _CALLS["grad_acc"]))
            lp, rows = [Vl * Dm], [Vl]
            kept_add(8 * 2 * tok + (s * tok if mean else 0))        # local rows, bags, weights
            act = _Act((Dm,))

        elif t == "linear":
            if len(act.shape) != 1:
                raise WorkloadError(f"{where}: input {act.shape} is not a vector; add a flatten")
            D, Fo = act.shape[0], int(spec["out"])
            bias = bool(spec.get("bias", True))
            gathered = False
            if sh == "column":
                oc = balanced_counts(Fo, tp)[0]
                Din, Fl, Fout = D, oc[r], oc[r]
                keep_split = _keeps_split(ent["branch"], ent["j"], tp, ent["at_end"])
                f_ph.append(compute(f"{name}.forward", 2 * b * D * Fl, "gemm", "forward",
                                    _CALLS["linear_fwd"], (b, D, Fl)))
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fl * s,
                                     "forward", _CALLS["bias_fwd"], b))
                if not keep_split:
                    # allgather_axis1: feature axis to the front and back (two copies)
                    gathered = True
                    f_ph.append(elem(f"{name}.forward.gather", 2 * b * (Fl + Fo) * s, "forward",
                                     6, Fl + Fo))
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
                if not split_in:        # take_axis: a copy of this rank's input block
                    f_ph.append(elem(f"{name}.forward.take", 2 * b * Din * s, "forward", 3, b))
                f_ph.append(compute(f"{name}.forward", 2 * b * Din * Fo, "gemm", "forward",
                                    _CALLS["linear_fwd"], (b, Din, Fo)))
                c, ph = comm(f"{name}.forward", "allreduce", b * Fo, "tp", "forward")
                f_cc.append(c); f_ph.append(ph)
                if bias:                # once, after the reduce
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fo * s,
                                     "forward", _CALLS["bias_fwd"], b))
                post = []
                if in_grad and not split_in:
                    f_gather = elem(f"{name}.backward.gather", 2 * b * (Din + D) * s, "backward",
                                    6, Din + D)
                    c, ph = comm(f"{name}.backward", "allgather", b * Din, "tp", "backward",
                                 "allgatherv", b * D * s)
                    b_cc.append(c); post += [f_gather, ph]
                new = _Act((Fo,))
            else:
                Din, Fl, Fout = D, Fo, Fo
                f_ph.append(compute(f"{name}.forward", 2 * b * D * Fo, "gemm", "forward",
                                    _CALLS["linear_fwd"], (b, D, Fo)))
                if bias:
                    f_ph.append(elem(f"{name}.forward.bias", _PASSES["bias_fwd"] * b * Fl * s,
                                     "forward", _CALLS["bias_fwd"], b))
                post = []
                new = _Act((Fo,))
            # as Linear.backward: db, dW in row blocks (a bucket may start after each), dx
            if gathered:                # adjoint of the gather: a copy of my block of dy
                b_ph.append(elem(f"{name}.backward.take", 2 * b * Fl * s, "backward", 3, b))
            if bias:
                b_ph.append(elem(f"{name}.backward.db", _PASSES["bias_bwd"] * b * Fl * s,
                                 "backward", _CALLS["bias_bwd"], b))
            w_at = len(b_ph)
            # dW = dy^T x: (Fl x b) @ (b x Din); dx = dy W: (b x Fl) @ (Fl x Din)
            b_ph.append(compute(f"{name}.backward", 2 * b * Din * Fl, "gemm", "backward",
                                _CALLS["linear_dw"], (Fl, b, Din)))
            b_ph.append(elem(f"{name}.backward.dW_done", 0, "backward", _CALLS["grad_write"]))
            if in_grad:
                b_ph.append(compute(f"{name}.backward.dx", 2 * b * Din * Fl, "gemm", "backward",
                                    _CALLS["linear_dx"], (b, Fl, Din)))
            b_ph += post
            lp = [Fl * Din] + ([Fl] if bias else [])
            rows = [Fl] * len(lp)
            if sh == "row" and not split_in:
                kept_add(b * Din * s)            # its copy of the input block
            else:
                kept_input(b * Din * s)
            act = new

        elif t == "conv2d":
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            K = int(spec["out"])
            R, S_ = F._pair(spec["kernel"])
            st, dl = F._pair(spec.get("stride", 1)), F._pair(spec.get("dilation", 1))
            pads = F.normalize_padding(spec.get("padding", 0))
            (pt, pb), (pl, pr) = pads
            Ho = F.conv_output_size(H, R, st[0], pt, pb, dl[0])
            Wo = F.conv_output_size(W, S_, st[1], pl, pr, dl[1])
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for kernel {R}x{S_}")
            bias = bool(spec.get("bias", True))
            post = []
            pre_f, after_f = [], []     # element-wise work before the GEMM / after the message
            gathered = False
            if sh == "out":
                oc = balanced_counts(K, tp)[0]
                Cl, Kl = C, oc[r]
                keep_split = _keeps_split(ent["branch"], ent["j"], tp, ent["at_end"])
                if not keep_split:
                    gathered = True
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", b * C * H * W, "tp", "backward")
                    b_cc.append(c); post.append(ph)
                new = _Act((K, Ho, Wo), tuple(oc) if keep_split else None)
            elif sh == "in":
                split_in = act.counts is not None
                ic = act.counts if split_in else balanced_counts(C, tp)[0]
                Cl, Kl = ic[r], K
                if not split_in:        # take_axis: a copy of this rank's channel block
                    pre_f.append(elem(f"{name}.forward.take", 2 * b * Cl * H * W * s, "forward",
                                      3, b * Cl))
                if bias:                # after the reduce: y += bias (broadcast over H, W)
                    after_f.append(elem(f"{name}.forward.bias", 2 * b * K * Ho * Wo * s,
                                        "forward", 2, b * K))
                if in_grad and not split_in:
                    c, ph = comm(f"{name}.backward", "allgather", b * Cl * H * W, "tp", "backward",
                                 "allgatherv", b * C * H * W * s)
                    b_cc.append(c)
                    post += [elem(f"{name}.backward.gather", 2 * b * (Cl + C) * H * W * s,
                                  "backward", 6, b * (Cl + C)), ph]
                new = _Act((K, Ho, Wo))
            else:
                Cl, Kl = C, K
                new = _Act((K, Ho, Wo))
            # conv2d_forward, per block of images (conv_blocks): unfold into the reused
            # column buffer, one batched GEMM written into the NCHW output, the bias (on
            # an out-channel or serial conv) while the block is in cache
            M = b * Ho * Wo
            f = 2 * b * Kl * Ho * Wo * Cl * R * S_
            # the conv rate is calibrated on conv2d_forward itself (unfold and GEMM per
            # block), so the forward is one phase at that rate
            f_ph += pre_f
            f_ph.append(compute(f"{name}.forward", f, "conv", "forward", 1))
            if gathered:
                f_ph.append(elem(f"{name}.forward.gather", 2 * b * (Kl + K) * Ho * Wo * s,
                                 "forward", 6, b * (Kl + K)))
                c, ph = comm(f"{name}.forward", "allgather", b * Kl * Ho * Wo, "tp", "forward",
                             "allgatherv", b * K * Ho * Wo * s)
                f_cc.append(c); f_ph.append(ph)
            if sh == "in":
                c, ph = comm(f"{name}.forward", "allreduce", b * K * Ho * Wo, "tp", "forward")
                f_cc.append(c); f_ph.append(ph)
            f_ph += after_f
            # conv2d_backward, block by block as the forward: (for a gathered output, my
            # block of dy), db = dy summed block by block; per block x unfolded again into the column
            # buffer and dW_i = dy_i col_i^T per image (the forward's work: unfold + GEMM,
            # so at the conv rate), the per-image dW summed into dW; with the input
            # gradient, dcol = W^T dy at the conv rate (a batched GEMM of the same FLOPs)
            # and col2im into dx; then the gradients accumulate into the buffers
            plan = conv_plan(Cl, H, W, R, S_, Ho, Wo, pads, st, dl)
            nblk, blocks_n = conv_blocks(b, plan, s)
            KD = Kl * Cl * R * S_
            if gathered:
                b_ph.append(elem(f"{name}.backward.take", 2 * M * Kl * s, "backward", 3, b * Kl))
            # db: per block, dy's block summed over L then over its images (3 calls)
            # into a float64 sum, cast once at the end; compiled: one call per block
            db_calls, db_rows = (blocks_n, 0) if jit else (3 * blocks_n, b * Kl)
            b_ph.append(elem(f"{name}.backward.dy", (1 if bias else 0) * M * Kl * s,
                             "backward", 2 + (db_calls + 1 if bias else 0), db_rows if bias else 0))
            b_ph.append(compute(f"{name}.backward", f, "conv", "backward"))
            # dW += dWb[:m].sum(axis=0): the block's per-image dW read, the block sum
            # written, then added (read both, write)
            b_ph.append(elem(f"{name}.backward.dW_sum", (b + 4.0 * blocks_n) * KD * s,
                             "backward", 2 * blocks_n))
            if in_grad:
                b_ph.append(compute(f"{name}.backward.dx", f, "conv", "backward"))
                b_ph.append(elem3(f"{name}.backward.col2im",
                                  col2im_cost(b, Cl, H, W, R, S_, Ho, Wo, pads, s, st, dl, jit),
                                  "backward"))
            b_ph.append(elem(f"{name}.backward.grad_acc",
                             _PASSES["grad_acc"] * (KD + (Kl if bias else 0)) * s,
                             "backward", 1 + (1 if bias else 0)))
            b_ph += post
            lp = [KD] + ([Kl] if bias else [])
            rows = [Kl] * len(lp)
            # the forward keeps its input x (a reference, or this rank's channel copy),
            # no columns; the reusable per-thread scratch (column buffer, per-image dW
            # block, dcol buffer) is counted once per conv geometry in "scratch"
            if sh == "in" and act.counts is None:
                kept_add(b * Cl * H * W * s)     # its copy of the input channels
            else:
                kept_input(b * Cl * H * W * s)
            if not plan.identity:
                scratch[("col", plan.key)] = nblk * Cl * R * S_ * Ho * Wo * s
                if in_grad:
                    scratch[("dcol", plan.key)] = nblk * Cl * R * S_ * Ho * Wo * s
            scratch[("dWb", plan.key, Kl)] = nblk * KD * s
            act = new

        elif t in NORMS:
            if len(act.shape) != (3 if t == "batchnorm2d" else 1):
                raise WorkloadError(f"{where}: input {act.shape} does not fit {t}")
            c_loc = xl[0]
            # per-channel broadcasts and reductions run a row per (sample, channel) of
            # a 4-d input, a row per sample of a 2-d one
            bc_rows = b * c_loc if t == "batchnorm2d" else b
            sync = 1 if dp > 1 else 0
            # the element-wise passes run per block of about BN_BLOCK_BYTES of x
            # (functional._bn_blocks) through one scratch block d (in "scratch")
            per = max(1, n_in // max(b, 1) * s)
            nbn = max(1, min(b, F.BN_BLOCK_BYTES // per))
            bn_blocks = -(-b // nbn) if b else 1
            bn_jit = jit and t == "batchnorm2d" and _prod(act.shape[1:]) >= F.BN_JIT_MIN_ROW
            if not bn_jit:
                scratch[("bn.d", nbn, c_loc, per)] = nbn * per
            # two phases: the passes on the scratch block (all the calls, each of a
            # block's size: the cached rate) and the passes over x, y, dy and dx
            # themselves ("io": priced as calls of the whole tensor's size, the rate of
            # an array that size -- main memory once it outgrows the caches)
            fio, bio = _PASSES["bn_fwd_io"], _PASSES["bn_bwd_io"]
            # a ReLU right after it runs inside its passes (mpifc.nn.fuse): the mask
            # written forward, read by both backward passes; the ReLU's own passes go
            nxt = ent["j"] + 1
            fuse_relu = (bn_jit and nxt < len(ent["branch"])
                         and ent["branch"][nxt].get("type") == "relu")
            if fuse_relu:
                fused_relus.add(i + 1)
            if bn_jit:
                # compiled: only the passes over x, y, dy, dx in memory, one call each
                # kernel; the per-channel set-up calls around them remain
                bn_blocks, fpass, bpass = 0, 0, 0
                fio_calls, bio_calls = _JIT_CALLS["bn_fwd"], _JIT_CALLS["bn_bwd"]
            else:
                fpass, bpass = _PASSES["bn_fwd"] - fio, _PASSES["bn_bwd"] - bio
                fio_calls, bio_calls = fio, bio
            f_ph.append(elem(f"{name}.forward", fpass * n_in * s, "forward",
                             _CALLS["bn_fwd"] + bn_blocks * _CALLS["bn_fwd_block"] - fio
                             + sync * _CALLS["bn_sync_fwd"], 6 * bc_rows if fpass else 0))
            f_ph.append(elem(f"{name}.forward.io", fio * n_in * s + (n_in if fuse_relu else 0),
                             "forward", fio_calls,
                             _JIT_ROWS["bn_fwd"] * bc_rows if bn_jit else 0))
            b_ph.append(elem(f"{name}.backward", bpass * n_in * s, "backward",
                             _CALLS["bn_bwd"] + bn_blocks * _CALLS["bn_bwd_block"] - bio
                             + sync * _CALLS["bn_sync_bwd"], 7 * bc_rows if bpass else 0))
            b_ph.append(elem(f"{name}.backward.io", bio * n_in * s + (2 * n_in if fuse_relu else 0),
                             "backward", bio_calls,
                             _JIT_ROWS["bn_bwd"] * bc_rows if bn_jit else 0))
            if dp > 1:       # SyncBatchNorm over the data group
                # float64 [sum x, sum x^2, count] (parallel/norm.py), whatever the model dtype
                c, ph = comm(f"{name}.forward", "allreduce", 2 * c_loc + 1, "dp", "forward",
                             itemsize=8)
                f_cc.append(c); f_ph.insert(1, ph)
                if in_grad:
                    c, ph = comm(f"{name}.backward", "allreduce", 2 * c_loc, "dp", "backward")
                    b_cc.append(c); b_ph.insert(1, ph)
            lp = [c_loc, c_loc]
            # x by reference (no xhat) and the shift, mean - shift and invstd (C,) each
            kept_input(n_in * s)
            kept_add(3 * c_loc * s)

        elif t == "layernorm":          # over the whole (replicated) per-sample shape
            if act.counts is not None:
                raise WorkloadError(f"{where} gets a split input")
            f_ph.append(elem(f"{name}.forward", _PASSES["ln_fwd"] * n_in * s, "forward", 12, b))
            b_ph.append(elem(f"{name}.backward", _PASSES["ln_bwd"] * n_in * s, "backward", 14, b))
            n_w = _prod(act.shape)
            lp, rows = [n_w, n_w], [act.shape[0]] * 2
            kept_add(n_in * s)

        elif t in ELEMENTWISE:
            if t == "relu" and i in fused_relus:     # inside the BatchNorm before it
                f_ph.append(elem(f"{name}.forward", 0.0, "forward", 1))
                b_ph.append(elem(f"{name}.backward", 0.0, "backward", 1))
            elif t == "relu" and jit:
                f_ph.append(elem(f"{name}.forward", (2.0 * s + 1) * n_in, "forward",
                                 _JIT_CALLS["relu"]))
                b_ph.append(elem(f"{name}.backward", (2.0 * s + 1) * n_in, "backward",
                                 _JIT_CALLS["relu"]))
            elif t == "relu":
                # 2 passes (forward) and 1 (backward) per block of samples
                nb = elementwise_blocks(b, n_in // max(b, 1) * s) - 1
                f_ph.append(elem(f"{name}.forward", _PASSES["relu_fwd"] * n_in * s, "forward",
                                 _CALLS["relu_fwd"] + 2 * nb))
                b_ph.append(elem(f"{name}.backward", _PASSES["relu_bwd"] * n_in * s, "backward",
                                 _CALLS["relu_bwd"] + nb))
            elif t == "dropout":
                # rng.random, >= p, astype, * 1/(1-p), x * mask ; dy * mask
                f_ph.append(elem(f"{name}.forward", (9.0 * s + 2) * n_in, "forward", 6))
                b_ph.append(elem(f"{name}.backward", 3.0 * n_in * s, "backward", 2))
            else:
                f_ph.append(elem(f"{name}.forward", _PASSES["act_fwd"] * n_in * s, "forward",
                                 _CALLS["act_fwd"][t]))
                b_ph.append(elem(f"{name}.backward", _PASSES["act_bwd"] * n_in * s, "backward",
                                 _CALLS["act_bwd"][t]))
            kept_add(n_in * (1 if t in ("relu", "dropout", "leakyrelu") else s))

        elif t in POOLS:
            if len(act.shape) != 3:
                raise WorkloadError(f"{where}: input {act.shape} is not (C, H, W)")
            C, H, W = act.shape
            R, S_ = F._pair(spec["kernel"])
            st = F._pair(spec.get("stride", (R, S_)))
            pads = F.normalize_padding(spec.get("padding", 0))
            (pt, pb), (pl, pr) = pads
            Ho = F.conv_output_size(H, R, st[0], pt, pb)
            Wo = F.conv_output_size(W, S_, st[1], pl, pr)
            if Ho <= 0 or Wo <= 0:
                raise WorkloadError(f"{where}: input {H}x{W} too small for pool {R}x{S_}")
            out_n = b * xl[0] * Ho * Wo
            cost = maxpool_cost if t == "maxpool2d" else avgpool_cost
            fc, bc = cost(b, xl[0], H, W, R, S_, st[0], st[1], pads, Ho, Wo, s)
            if jit and t == "maxpool2d" and F._maxpool_tiles(R, S_, st[0], st[1], pads):
                io = b * xl[0] * H * W * s + out_n * (s + 1)      # x or dx, y or dy, offset
                fc = bc = (io, _JIT_CALLS["pool"], _JIT_ROWS["pool"] * b * xl[0] * Ho)
            # the argmax offset is updated without a branch (functional._select_where):
            # no masked store
            f_ph.append(elem3(f"{name}.forward", fc, "forward"))
            b_ph.append(elem3(f"{name}.backward", bc, "backward"))
            # max: the argmax offset per output (uint8; int32 from 256 window positions)
            kept_add(out_n * (1 if t != "maxpool2d" or R * S_ < 256 else 4))
            act = _Act((C, Ho, Wo), act.counts)

        elif t == "globalavgpool2d":
            # mean over (H, W): a row per (sample, channel); backward: scale, broadcast copy
            f_ph.append(elem(f"{name}.forward", n_in * s, "forward", 2, b * xl[0]))
            b_ph.append(elem(f"{name}.backward", n_in * s + 2 * b * xl[0] * s, "backward", 4,
                             b * xl[0]))
            act = _Act((act.shape[0],), act.counts)

        else:   # flatten: (c_r, H, W) -> c_r*H*W features, channel-major (a view)
            f_ph.append(elem(f"{name}.forward", 0, "forward", _CALLS["flatten"]))
            b_ph.append(elem(f"{name}.backward", 0, "backward", _CALLS["flatten"]))
            per = _prod(act.shape[1:])
            act = _Act((_prod(act.shape),),
                       None if act.counts is None else tuple(c * per for c in act.counts))

        if t in ELEMENTWISE or t in NORMS or t == "layernorm":
            act = _Act(act.shape, act.counts)        # a new array of the same shape
        fwd_ph += f_ph
        fwd_cc += f_cc
        if i >= first_param:
            blocks.append((b_ph, b_cc, lp, rows or list(lp), w_at, ent["depth"] > 0, None))
        param_sizes += lp
        peak = max(peak, b * _prod(act.local(r)) * s)

    # ---- loss: class-parallel on split logits, else local (no message) ----
    if len(act.shape) != 1:
        raise WorkloadError(f"the model's output {act.shape} is not a vector of class scores")
    Ql = act.local(r)[0]
    loss_cc: list[Collective] = []
    par_loss = act.counts is not None
    lc = ("ploss_fwd", "pmetrics", "ploss_bwd") if par_loss else ("loss_fwd", "metrics", "loss_bwd")
    # the loss and its metrics are small reductions and fancy indexing on (b, Ql):
    # priced as reduction calls (ComputeRates.reduce_call_s)
    loss_ph = [elem("loss.forward", _PASSES["loss_fwd"] * b * Ql * s, "forward", 0, b,
                    reduce_calls=_CALLS[lc[0]])]
    if act.counts is not None:
        for count in (b, 2 * b):
            c, ph = comm("loss.forward", "allreduce", count, "tp", "forward")
            loss_cc.append(c); loss_ph.append(ph)
    if accuracy:
        loss_ph.append(elem("loss.metrics", _PASSES["metrics"] * b * Ql * s, "forward", 0,
                            reduce_calls=_CALLS[lc[1]]))
        if act.counts is not None:
            c, ph = comm("loss.metrics", "allreduce", b, "tp", "forward", itemsize=8)
            loss_cc.append(c); loss_ph.append(ph)
    # the loss gradient, and DataParallel's 1/P scaling of it (dp > 1)
    loss_ph.append(elem("loss.backward", (_PASSES["loss_bwd"] + (2 if dp > 1 else 0)) * b * Ql * s,
                        "backward", 1 if dp > 1 else 0, b, reduce_calls=_CALLS[lc[2]]))

    # ---- backward, launching data-parallel buckets (mpifc.parallel.data.plan_buckets) ----
    params = sum(param_sizes)
    cap = bucket_cap(cap / 2**20, params * s, min_buckets)
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
        if overlap:      # posting it: the trace phase, iallreduce, the progress thread
            bwd_ph.append(elem(f"dp.grad_bucket{k}.post", 0, "backward", _CALLS["bucket_post"]))
        ph = Phase("comm", f"dp.grad_bucket{k}.allreduce", op="allreduce", group="dp",
                   bytes=float(c.bytes), overlappable=overlap, stage="backward")
        (bwd_ph if overlap else dp_ph).append(ph)

    for li in reversed(range(len(blocks))):
        ph_list, cc, lp, rows, w_at, deferred, release = blocks[li]
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
            w, acc = ph_list[w_at], ph_list[w_at + 1]
            for k, r0, r1 in pieces.pop((li, 0)):
                if dp == 1:       # a one-rank group computes dW in one block (DataParallel)
                    if r0 == 0:
                        bwd_ph += [w, acc]
                    piece_done(k)
                    continue
                frac = (r1 - r0) / max(rows[0], 1)
                bwd_ph.append(Phase("compute", w.label, flops=w.flops * frac, op_kind=w.op_kind,
                                    stage=w.stage, calls=w.calls))
                bwd_ph.append(Phase("compute", acc.label, bytes=acc.bytes * frac,
                                    op_kind=acc.op_kind, stage=acc.stage, calls=acc.calls))
                piece_done(k)
            bwd_ph += ph_list[w_at + 2:]
        # the layer's gradients are final: the rest of its pieces, in buffer order
        # (parameters reversed, rows ascending: DataParallel._layer_done); inside a
        # residual block only once the whole block (its begin entry) is done
        for lj in ([] if deferred else [li]) + list(reversed(release or [])):
            for j in reversed(range(len(blocks[lj][2]))):
                for k, _, _ in pieces.pop((lj, j), []):
                    piece_done(k)
    if not overlap:      # the blocking mode reduces every bucket after backward, in order
        order = sorted(range(len(dp_cc)), key=lambda i: int(dp_cc[i].phase[len("dp.grad_bucket"):]))
        dp_cc, dp_ph = [dp_cc[i] for i in order], [dp_ph[i] for i in order]

    # ---- clipping and optimizer (element-wise over the local parameters) ----
    # one phase per parameter tensor: the optimizer's calls run on each tensor, so a
    # call's size (which picks the element-wise rate) is the tensor's
    o = cfg["optim"]
    opt_ph: list[Phase] = []
    clip_cc: list[Collective] = []
    n_tensors = len(param_sizes)
    if o.get("clip_norm"):
        # per tensor: reshape, dot, float ; then every gradient *= coef (when clipped)
        opt_ph.append(elem("clip.norm", params * s, "optimizer", 3 * n_tensors, stream=True))
        if tp > 1:
            c, ph = comm("clip.norm", "allreduce", 1, "tp", "optimizer", itemsize=8)
            clip_cc.append(c); opt_ph.append(ph)
        opt_ph.append(elem("clip.scale", 2 * params * s, "optimizer", n_tensors, stream=True))
    passes, per_tensor, slots = optimizer_cost(o, jit)
    per_chunk = optimizer_chunk_calls(o, jit)
    opt_ph.append(elem("optimizer.step", 0, "optimizer", 1))
    for k, n in enumerate(param_sizes):
        chunks = -(-n // CHUNK_ELEMENTS) if per_chunk else 1
        opt_ph.append(elem(f"optimizer.step.{k}", passes * n * s, "optimizer",
                           per_tensor + (chunks - 1) * per_chunk, stream=True))

    # ---- the trainer around the step: data in scatter mode, the finite-loss check ----
    data_cc: list[Collective] = []
    data_ph: list[Phase] = []
    if cfg.get("data", {}).get("mode") == "scatter" and text:
        raise WorkloadError("data.mode = \"scatter\" of a text dataset is not described; "
                            "use data.mode = \"slice\"")
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

    # the trainer's step around the layers (zero_grad: a flag per parameter, no bytes;
    # the calls into forward, loss, backward, synchronize, step and the finite-loss check)
    step_ph = [elem("step.zero_grad", 0, "forward", len(groups), stream=True),
               elem("step.calls", 0, "forward", _CALLS["step"])]
    phases = data_ph + step_ph + fwd_ph + loss_ph + bwd_ph + dp_ph + opt_ph
    # trace order: a non-blocking bucket is recorded at its wait, after the backward
    collectives = data_cc + fwd_cc + loss_cc + bwd_cc + dp_cc + clip_cc
    memory = {
        "parameters": params * s,
        "gradients": params * s,       # the bucket buffers themselves (grads are views)
        "optimizer": slots * params * s,
        "activations": sum(kept.values()) + 2 * peak,
        "scratch": float(sum(scratch.values())),
    }
    wl = Workload(name=f"{cfg.get('name', 'model')} dp={dp} tp={tp} batch={B}", phases=phases,
                  samples_per_step=B, memory_bytes_per_rank=float(sum(memory.values())),
                  dp=dp, tp=tp)
    return StepDescription(collectives, wl, params, memory, names, kept)


def config_workload(cfg: dict, dp: int, tp: int, **kw) -> Workload:
    """The engine :class:`Workload` of :func:`describe_step` (slowest rank: dp/tp rank 0)."""
    return describe_step(cfg, dp, tp, **kw).workload


def workload_builder(cfg: dict, **kw):
    """``build(dp, tp) -> Workload`` for :func:`mpifc.sim.planner.workload_cost`."""
    def build(dp: int, tp: int) -> Workload:
        return config_workload(cfg, dp, tp, **kw)
    return build
