"""The compute model's cost terms by hand: per-call cost, size-dependent element-wise
rate, strided rows; the kernel costs the analytic workload counts from the NumPy code
(im2col, col2im, pooling, optimizers); calls carried through the engine."""
import math

import pytest

from mpifc.config import load_config
from mpifc.nn import functional as F
from mpifc.sim.cluster import Cluster, ComputeRates, LinkModel, loads
from mpifc.sim.commands import share_cores
from mpifc.sim.engine import Phase, Workload, simulate
from mpifc.sim.workload import (col2im_cost, describe_step, gemm_aspect, im2col_cost,
                                maxpool_cost, optimizer_cost)


def _rates(**kw):
    base = dict(gemm_gflops=10.0, elementwise_gbps=10.0,
                elementwise_curve=[(1e3, 2.0), (1e5, 8.0)], call_s=1e-6, row_s=1e-8)
    base.update(kw)
    return ComputeRates(**base)


def test_call_row_and_curve_terms_by_hand():
    r = _rates()
    # 1e6 B in 100 calls: 1e4 B per call, halfway in log between 1e3 and 1e5 -> 5 GB/s;
    # 100 calls x 1 us; 1000 rows x 10 ns
    assert r.seconds("elementwise", nbytes=1e6, calls=100, rows=1000) == pytest.approx(
        1e6 / 5e9 + 100e-6 + 1000e-8)
    # below the curve: clamped to its first rate (2 GB/s)
    assert r.seconds("elementwise", nbytes=1e3, calls=10) == pytest.approx(1e3 / 2e9 + 10e-6)
    # no calls: the streaming rate, no per-call cost (a replayed gap keeps its length)
    assert r.seconds("elementwise", nbytes=1e6) == pytest.approx(1e6 / 10e9)
    # calls only
    assert r.seconds("elementwise", calls=5) == pytest.approx(5e-6)
    # a GEMM pays its calls on top of its FLOPs
    assert r.seconds("gemm", flops=1e9, calls=2) == pytest.approx(0.1 + 2e-6)
    assert r.elementwise_rate(1e5) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="call_s"):
        ComputeRates(call_s=-1.0)
    with pytest.raises(ValueError, match="elementwise_curve"):
        ComputeRates(elementwise_curve=[(0.0, 1.0)])


def test_thin_products_by_aspect():
    assert gemm_aspect(128, 128, 128) == pytest.approx(1.0)
    assert gemm_aspect(32, 256, 256) == pytest.approx(32 / 128)      # (32 * 256^2)^(1/3) = 128
    assert gemm_aspect(256, 32, 256) == gemm_aspect(256, 256, 32) == gemm_aspect(32, 256, 256)
    r = _rates(gemm_aspect_curve=[(0.1, 0.5), (0.4, 0.8)])
    # 0.2 is halfway in log between 0.1 and 0.4: 0.65; 0.7 lies between 0.4 and the
    # implicit (1, 1): 0.8 + 0.2 * ln(1.75) / ln(2.5); clamped below; 1 at aspect >= 1
    assert r.aspect_efficiency(0.2) == pytest.approx(0.65)
    assert r.aspect_efficiency(0.7) == pytest.approx(0.8 + 0.2 * math.log(1.75) / math.log(2.5))
    assert r.aspect_efficiency(0.01) == pytest.approx(0.5)
    assert r.aspect_efficiency(1.0) == 1.0 and _rates().aspect_efficiency(0.1) == 1.0
    # 1e9 flops at 10 GFLOP/s, 2 calls of 1 us: 0.1 s square, 0.1 / 0.65 s at aspect 0.2
    assert r.seconds("gemm", flops=1e9, calls=2, aspect=0.2) == pytest.approx(2e-6 + 0.1 / 0.65)
    assert r.seconds("gemm", flops=1e9, calls=2) == pytest.approx(2e-6 + 0.1)
    # the workload gives each linear GEMM the aspect of (batch, in, out)
    cfg = load_config("digits-mlp")
    w = describe_step(cfg, 1, 1, global_batch=32).workload
    asp = {p.label: p.aspect for p in w.phases if p.op_kind == "gemm" and p.flops}
    assert asp["fc2.forward"] == asp["fc2.backward"] == asp["fc2.backward.dx"] == pytest.approx(
        gemm_aspect(32, 256, 256))
    assert asp["fc3.forward"] == pytest.approx(gemm_aspect(32, 256, 10))


def test_layer_kernels_use_the_kernel_curve():
    r = _rates(kernel_curve=[(1e3, 1.0), (1e5, 4.0)])
    # a layer kernel (stream=False): 1e4 B per call is halfway in log -> 2.5 GB/s
    assert r.seconds("elementwise", nbytes=1e6, calls=100, stream=False) == pytest.approx(
        1e6 / 2.5e9 + 100e-6)
    # a streaming update keeps the element-wise curve (5 GB/s there)
    assert r.seconds("elementwise", nbytes=1e6, calls=100, stream=True) == pytest.approx(
        1e6 / 5e9 + 100e-6)
    # no kernel curve: layer kernels fall back to the element-wise curve
    assert _rates().seconds("elementwise", nbytes=1e6, calls=100, stream=False) == pytest.approx(
        1e6 / 5e9 + 100e-6)
    # the engine passes the phase's flag; the workload marks only updates as streaming
    w = describe_step(load_config("digits-mlp"), 1, 1, global_batch=64).workload
    streams = {ph.label.split(".")[0] for ph in w.phases if ph.kind == "compute" and ph.stream}
    assert streams == {"step", "optimizer"}
    assert any(ph.op_kind == "elementwise" and not ph.stream for ph in w.phases)


def _cluster(rates, rpn=2):
    return Cluster(name="hand", nodes=1, ranks_per_node=rpn,
                   intra=LinkModel.constant(0.0, 1e9), inter=LinkModel.constant(0.0, 1e9),
                   reduction_Bps=1e30, compute=rates)


def test_engine_prices_calls_and_rows():
    rates = ComputeRates(gemm_gflops=1.0, elementwise_gbps=1.0, call_s=1e-6, row_s=1e-8)
    w = Workload("k", [Phase("compute", "mm", flops=1e6, calls=2),
                       Phase("compute", "ew", op_kind="elementwise", bytes=1e6, calls=4, rows=100,
                             repeat=2)],
                 samples_per_step=1, memory_bytes_per_rank=0, dp=1, tp=1)
    r = simulate(w, _cluster(rates))
    assert r.compute_by_kind["gemm"] == pytest.approx(1e-3 + 2e-6)
    assert r.compute_by_kind["elementwise"] == pytest.approx(2 * (1e-3 + 4e-6 + 1e-6))
    assert r.step_s == pytest.approx(3e-3 + 2e-6 + 10e-6)
    with pytest.raises(ValueError, match="rows and masked must be >= 0"):
        Phase("compute", "x", calls=-1)


def test_toml_round_trip_and_shared_cores():
    c = _cluster(_rates(), rpn=4)
    assert loads(c.to_toml()) == c
    k = _cluster(_rates(kernel_curve=[(1e3, 0.5), (1e5, 2.0)]))
    assert loads(k.to_toml()) == k
    s = share_cores(c, 2)                          # 4 ranks on 2 cores: half a core each
    assert s.compute.call_s == pytest.approx(2e-6) and s.compute.row_s == pytest.approx(2e-8)
    assert s.compute.elementwise_curve == [(1e3, 1.0), (1e5, 4.0)]
    assert share_cores(k, 1).compute.kernel_curve == [(1e3, 0.25), (1e5, 1.0)]


def test_im2col_and_col2im_costs_by_hand():
    pads = ((1, 1), (1, 1))
    # N=2, C=3, 4x4 input, 3x3 kernel, padding 1 -> 4x4 output, float32, one block.
    # A 'same' conv (im2col.ConvPlan.flat): per offset one copy of the flattened 4x4
    # plane shifted by delta = 4 dr + dc (dr, dc in -1..1): 16 - |delta| pixels, 118 over
    # the 9 offsets, a row per (image, channel); the 6 offsets with a padding column
    # zero it again afterwards (4 pixels each, a row per (image, channel))
    nb, calls, rows = im2col_cost(2, 3, 4, 4, 3, 3, 4, 4, pads, 4)
    assert (nb, calls, rows) == (6 * (2 * 118 + 6 * 4) * 4, 9 + 6, 6 * (9 + 6))
    # col2im: zero dcol's 6 padding columns, the centre offset assigns dx (16 pixels),
    # the other 8 add their 102 pixels with a shifted += (3 passes, 3 strided operands)
    nb, calls, rows = col2im_cost(2, 3, 4, 4, 3, 3, 4, 4, pads, 4)
    assert (nb, calls, rows) == (6 * (6 * 4 + 2 * 16 + 3 * 102) * 4, 6 + 1 + 8, 6 * (6 + 1 + 3 * 8))
    # no padding: no offset covers the input, dx is zero-filled, 9 strided +=
    assert im2col_cost(2, 3, 4, 4, 3, 3, 2, 2, ((0, 0), (0, 0)), 4) == (2 * 6 * 36 * 4, 9, 108)
    assert col2im_cost(2, 3, 4, 4, 3, 3, 2, 2, ((0, 0), (0, 0)), 4) == (
        6 * 16 * 4 + 3 * 6 * 36 * 4, 10, 3 * 108)
    # a 1x1 stride-1 conv: x is the columns and dcol is dx (nothing copied)
    assert im2col_cost(2, 3, 4, 4, 1, 1, 4, 4, ((0, 0), (0, 0)), 4) == (0.0, 0, 0)
    assert col2im_cost(2, 3, 4, 4, 1, 1, 4, 4, ((0, 0), (0, 0)), 4) == (0.0, 0, 0)
    # digits-cnn conv2 at batch 64: 18432 bytes of columns per image, 113 per 2 MiB
    # block: one block, copying per offset and zeroing 6 padding columns; at batch 256
    # three blocks (113, 113, 30)
    assert im2col_cost(64, 32, 4, 4, 3, 3, 4, 4, pads, 4)[1] == 9 + 6
    assert im2col_cost(256, 32, 4, 4, 3, 3, 4, 4, pads, 4)[1] == 3 * (9 + 6)


def test_conv_backward_phases():
    # digits-cnn conv2 (32 -> 64 channels, 4x4, batch 64): dW in 1 block of per-image
    # products summed (read 64 x K x D, write and add the block sum), col2im's new form
    by = {p.label: p for p in describe_step(load_config("digits-cnn"), 1, 1, global_batch=64,
                                            kernels="numpy").workload.phases}
    KD = 64 * 32 * 9
    assert by["conv2.backward.dW_sum"].bytes == (64 + 4 * 1) * KD * 4
    assert by["conv2.backward.col2im"].bytes == col2im_cost(
        64, 32, 4, 4, 3, 3, 4, 4, ((1, 1), (1, 1)), 4)[0]
    assert by["conv2.backward.dy"].bytes == 64 * 16 * 64 * 4       # db: one read of dy
    assert "conv1.backward.col2im" not in by                       # first layer: no dx


def test_maxpool_cost_by_hand():
    # (2, 3, 4, 4) -> 2x2 windows, stride 2: tiling, two stages. Stage 1 on the 48
    # window-row elements (compare 2s+1, maximum 3s; column index = the mask itself);
    # stage 2 on the 24 outputs (compare 2s+1, index + 2, subtract, *=, + (3 each),
    # maximum 3s); strided rows once per strided operand: stage 1's column views run
    # over H and W in one strided run (a row per (n, c): 6), compare and maximum each
    # read two; stage 2 on rows of Wo (N*C*Ho = 12): 7 strided operands; then the
    # block's y and idx are copied into the outputs (2s + 2 bytes, 2 calls, 2 x 12 rows)
    fwd, bwd = maxpool_cost(2, 3, 4, 4, 2, 2, 2, 2, ((0, 0), (0, 0)), 2, 2, 4)
    assert fwd == (48 * 21 + 24 * 32 + 24 * 10, 6 + 2 + 6 + 2, 4 * 6 + 7 * 12 + 2 * 12)
    # a 5x5 input with 2x2 windows: stage 1 views leave column 4 out (a row per
    # window row, N*C*Ho*R = 24)
    assert maxpool_cost(2, 3, 5, 5, 2, 2, 2, 2, ((0, 0), (0, 0)), 2, 2, 4)[0][2] == (
        4 * 24 + 7 * 12 + 2 * 12)
    # windows cover the input exactly: no zero fill; 4 offsets x (idx == k: 2,
    # dy * mask into the window: 1 + 2s)
    assert bwd == (4 * 24 * 11, 3 + 12, 4 * 12)
    # overlapping windows: the generic loop (first window copied, then per offset
    # compare, branch-free index update 8, maximum), zero-filled dx, += via a temporary
    fwd3, bwd3 = maxpool_cost(2, 3, 4, 4, 2, 2, 1, 1, ((0, 0), (0, 0)), 3, 3, 4)
    assert fwd3[0] == 54 + 2 * 54 * 4 + 3 * 54 * 29
    assert bwd3[0] == 96 * 4 + 4 * 54 * 23 and bwd3[1] == 3 + 16


def test_max_pooling_has_no_masked_stores():
    # the argmax offset is updated arithmetically (functional._select_where): no
    # data-dependent branch, so no phase pays masked_s
    by = {p.label: p for p in describe_step(load_config("digits-cnn"), 1, 1,
                                            global_batch=64).workload.phases}
    assert by["pool1.forward"].masked == 0 and by["pool2.forward"].masked == 0
    r = _rates(masked_s=5e-9)
    ph = by["pool1.forward"]
    args = dict(nbytes=ph.bytes, calls=ph.calls, rows=ph.rows, stream=False)
    assert r.seconds("elementwise", masked=ph.masked, **args) == r.seconds("elementwise", **args)


def test_batchnorm_blocks():
    # bn1 of digits-cnn at batch 64: (64, 32, 8, 8) float32, 8 KiB a sample, 64 samples
    # per 512 KiB block (BN_BLOCK_BYTES): 1 block; bn2 (64, 64, 4, 4): 1 block
    d = describe_step(load_config("digits-cnn"), 1, 1, global_batch=64, kernels="numpy")
    by = {p.label: p for p in d.workload.phases}
    from mpifc.sim.workload import _CALLS
    def both(label):         # the block passes and the passes over the tensors (io)
        io = by[label + ".io"]
        return [by[label].calls + io.calls, by[label].bytes + io.bytes]
    n1, n2 = 64 * 32 * 64 * 4, 64 * 64 * 16 * 4
    blocks1 = -(-64 // (F.BN_BLOCK_BYTES // (32 * 64 * 4)))         # samples of 8 KiB
    assert both("bn1.forward") == [_CALLS["bn_fwd"] + blocks1 * _CALLS["bn_fwd_block"], 11 * n1]
    assert both("bn2.backward") == [_CALLS["bn_bwd"] + _CALLS["bn_bwd_block"], 16 * n2]
    # io: x twice and y once forward; x and dy twice and dx once backward, each call
    # the size of the whole tensor (the rate of an array that size)
    assert by["bn1.forward.io"].bytes / by["bn1.forward.io"].calls == n1
    assert by["bn1.backward.io"].bytes == 5 * n1 and by["bn1.backward.io"].calls == 5
    assert d.memory["scratch"] > 0


def test_compiled_kernels_price_one_pass_each():
    """kernels="numba" (mpifc.nn.hostjit): BatchNorm, ReLU and tiled max pooling cost
    their main-memory passes and a few calls; no block passes, no scratch block."""
    from mpifc.sim.workload import _CALLS, _JIT_CALLS
    cfg = load_config("digits-cnn")
    d = describe_step(cfg, 1, 1, global_batch=64, kernels="numba")
    by = {p.label: p for p in d.workload.phases}
    n1 = 64 * 32 * 64 * 4                                   # bn1 / relu1 / pool1 input bytes
    assert by["bn1.forward"].bytes == 0 and by["bn1.forward"].rows == 0
    # relu1 runs inside bn1 (mpifc.nn.fuse): its 1-byte mask written forward, read by
    # both backward passes; relu1's own phases move nothing
    assert by["bn1.forward.io"].bytes == 3 * n1 + n1 // 4
    assert by["bn1.forward.io"].calls == _JIT_CALLS["bn_fwd"]
    assert by["bn1.backward.io"].bytes == 5 * n1 + 2 * (n1 // 4)
    assert by["bn1.forward"].calls == _CALLS["bn_fwd"] - 3       # the set-up calls remain
    assert by["relu1.forward"].bytes == by["relu1.backward"].bytes == 0
    # a ReLU after a linear layer is not fused: x, y and the mask; dy, the mask, dx
    assert by["relu3.forward"].bytes == by["relu3.backward"].bytes == 64 * 64 * 9
    assert by["pool1.forward"].bytes == n1 + n1 // 4 // 4 * 5   # x; y and the offset
    from mpifc.sim.workload import _JIT_ROWS
    assert by["bn1.forward.io"].rows == _JIT_ROWS["bn_fwd"] * 64 * 32      # a row per (n, c)
    assert by["pool1.forward"].rows == _JIT_ROWS["pool"] * 64 * 32 * 4     # per output row
    # col2im of 32 channels at 16x16 ('same' 3x3): one call per block, every offset
    # added (the centre too), dx zeroed; the NumPy version assigns the centre
    pads, L = ((1, 1), (1, 1)), 256
    jb, jc, jr = col2im_cost(64, 32, 16, 16, 3, 3, 16, 16, pads, 4, jit=True)
    nb_, nc, _ = col2im_cost(64, 32, 16, 16, 3, 3, 16, 16, pads, 4)
    assert jr == 0 and jc < nc and jb == nb_ + 64 * 32 * L * 4 * 2   # centre: 3 passes, not 2 - zero fill
    # below JIT_MIN_PLANE pixels (digits-cnn's conv2, 4x4) it stays NumPy
    assert col2im_cost(64, 32, 4, 4, 3, 3, 4, 4, pads, 4, jit=True) == col2im_cost(
        64, 32, 4, 4, 3, 3, 4, 4, pads, 4)
    assert by["conv2.backward.col2im"].rows > 0
    # any other geometry (here 'valid', 12x12 -> 10x10): dx zeroed, 9 rectangles added
    assert col2im_cost(2, 3, 12, 12, 3, 3, 10, 10, ((0, 0), (0, 0)), 4, jit=True) == (
        2 * 3 * (144 + 3.0 * 9 * 100) * 4, 1, 0)
    numpy = describe_step(cfg, 1, 1, global_batch=64, kernels="numpy")
    # no bn.d scratch blocks: each of bn1, bn2 holds its whole 64-sample input (< a block)
    assert numpy.memory["scratch"] - d.memory["scratch"] == n1 + 64 * 64 * 16 * 4
    assert numpy.workload.phases != d.workload.phases
    with pytest.raises(ValueError, match="kernels='cuda'"):
        describe_step(cfg, 1, 1, kernels="cuda")


def test_optimizer_costs():
    assert optimizer_cost({"name": "adam"}) == (31, 16, 2)
    assert optimizer_cost({"name": "adamw", "weight_decay": 0.01}) == (33, 17, 2)
    assert optimizer_cost({"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4}) == (15, 9, 1)
    assert optimizer_cost({"name": "sgd"}) == (5, 5, 0)
    # compiled SGD (mpifc.nn.hostjit): p, g read, p written (+ the momentum read and written)
    from mpifc.sim.workload import _JIT_CALLS, optimizer_chunk_calls
    assert optimizer_cost({"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4}, jit=True) == (
        5, _JIT_CALLS["sgd"], 1)
    assert optimizer_cost({"name": "sgd"}, jit=True)[0] == 3
    assert optimizer_chunk_calls({"name": "sgd", "momentum": 0.9}, jit=True) == 0
    assert optimizer_cost({"name": "adamw", "weight_decay": 0.01}, jit=True) == (7, _JIT_CALLS["sgd"], 2)


def test_workload_carries_calls():
    cfg = load_config("digits-mlp")            # adam; 3 linear layers: 6 parameter tensors
    d = describe_step(cfg, 1, 1, global_batch=64, kernels="numpy")
    opt = [p for p in d.workload.phases if p.label.startswith("optimizer.step.")]
    assert len(opt) == 6 and all(p.calls == 16 for p in opt)
    assert sum(p.bytes for p in opt) == 31 * d.params * 4
    assert all(p.calls + p.reduce_calls > 0 for p in d.workload.phases if p.kind == "compute")
    # the loss and its metrics: reduction / indexing calls (ComputeRates.reduce_call_s)
    loss = {p.label: p for p in d.workload.phases if p.label.startswith("loss.")}
    assert set(loss) == {"loss.forward", "loss.metrics", "loss.backward"}
    assert all(p.reduce_calls > 0 and p.calls == 0 for p in loss.values())
    r = _rates(reduce_call_s=4e-6)
    ph = loss["loss.metrics"]
    assert r.seconds("elementwise", nbytes=ph.bytes, reduce_calls=ph.reduce_calls,
                     stream=False) == pytest.approx(
        ph.reduce_calls * 4e-6 + ph.bytes / (r.elementwise_rate(ph.bytes / ph.reduce_calls) * 1e9))
    assert _rates().seconds("elementwise", reduce_calls=3) == pytest.approx(3e-6)   # call_s
    # dp = 2: each gradient bucket is posted from the main stream (calls, no bytes)
    d2 = describe_step(cfg, 2, 1, global_batch=64)
    posts = [p for p in d2.workload.phases if p.label.endswith(".post")]
    assert len(posts) == sum(1 for c in d2.collectives if c.group == "dp") and posts
    # the convolution: forward and both backward GEMMs at the conv rate (calibrated on
    # conv2d_forward), col2im only with the input gradient; rows from strided passes
    cnn = describe_step(load_config("digits-cnn"), 1, 1, global_batch=64)
    by = {p.label: p for p in cnn.workload.phases}
    assert by["conv1.forward"].op_kind == "conv" and by["conv2.backward.dx"].op_kind == "conv"
    assert "conv2.backward.col2im" in by and "conv1.backward.col2im" not in by
    assert sum(p.rows for p in cnn.workload.phases) > 0
