"""Pure forward/backward pairs: the math every serial and sharded layer reuses.

No state, no communication. Each op is a ``*_forward`` returning its output and
a small ``cache`` (only what backward needs), and a ``*_backward`` beside it.
Backward functions *return* gradients; layers accumulate them into
``Parameter.grad`` with ``+=``.

Shape letters
-------------
N batch, D features in, F features out, C channels in, K channels out,
H, W input height/width, Ho, Wo output height/width, R, S kernel height/width,
G groups, V vocabulary size, L tokens per bag (padded), T tokens in total,
Q classes.

Padding convention (conv and pool)
----------------------------------
``padding`` is an int ``p`` (all four sides), a pair ``(ph, pw)`` (symmetric per
axis) or per side ``((top, bottom), (left, right))``. A spatial-parallel layer
passes ``top=0`` (or ``bottom=0``) on a side whose halo rows it received from a
neighbour and prepended (appended) to ``x``.

Collective hooks
----------------
BatchNorm is split so the per-channel sums are computed in exactly one place
(``batchnorm_stats``, ``batchnorm_backward_stats``); a synced BatchNorm
allreduces those small vectors and passes them on to ``*_from_stats``. The
forward statistics are float64 moments (mean, M2) of shifted data, exact for any
input offset; ranks merge them as power sums (Chan's merge, one allreduce).
"""
from __future__ import annotations

import math

import numpy as np

from mpifc.backend import get_array_module, is_device_array
from mpifc.nn import blockpool, hostblas, hostjit
from mpifc.nn.im2col import ConvPlan, col2im_block, col2im_planes, im2col_block, im2col_planes, workspace


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def normalize_padding(padding):
    """Return ``((top, bottom), (left, right))`` from an int, pair or per-side pair of pairs."""
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and isinstance(padding[0], (tuple, list)):
        (t, b), (l, r) = padding
        out = ((int(t), int(b)), (int(l), int(r)))
    else:
        ph, pw = _pair(padding)
        out = ((ph, ph), (pw, pw))
    if min(out[0] + out[1]) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return out


def conv_output_size(size, kernel, stride, pad_lo, pad_hi, dilation=1):
    """Output length along one axis: floor((size + pads - dilation*(kernel-1) - 1)/stride) + 1."""
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _pad(x, pads, value=0.0):
    """Pad the last two axes of an (N, C, H, W) array into a fresh buffer (no copy if no padding)."""
    (t, b), (l, r) = pads
    if t == b == l == r == 0:
        return x
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = xp.empty((N, C, H + t + b, W + l + r), dtype=x.dtype)
    # fill only the border, then copy the interior once
    if t:
        out[:, :, :t] = value
    if b:
        out[:, :, H + t:] = value
    if l:
        out[:, :, t:t + H, :l] = value
    if r:
        out[:, :, t:t + H, W + l:] = value
    out[:, :, t:t + H, l:l + W] = x
    return out


def _window_slices(r, s, dh, dw, sh, sw, Ho, Wo):
    """Slices of the padded input that kernel offset (r, s) reads for every output pixel."""
    return (slice(r * dh, r * dh + sh * (Ho - 1) + 1, sh),
            slice(s * dw, s * dw + sw * (Wo - 1) + 1, sw))


# --------------------------------------------------------------------------- #
# linear:  y = x @ W.T + b
# --------------------------------------------------------------------------- #
def linear_forward(x, W, b=None):
    """Fully connected layer.

    Parameters
    ----------
    x : (N, D) or (..., D)
    W : (F, D)
    b : (F,) or None

    Returns
    -------
    y : (N, F) or (..., F)
    """
    y = hostblas.matmul(x, W.T)
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, W, need_dx=True, need_db=True):
    """Gradients of :func:`linear_forward`.

    Parameters
    ----------
    dy : (N, F) or (..., F)
    x : (N, D) or (..., D), the forward input
    W : (F, D)

    Returns
    -------
    dx : (N, D) or None when ``need_dx`` is False
    dW : (F, D)
    db : (F,) or None when ``need_db`` is False
    """
    dx = linear_backward_input(dy, W) if need_dx else None
    dW = linear_backward_weight(dy, x)
    db = linear_backward_bias(dy) if need_db else None
    return dx, dW, db


def _rows2(a):
    rows = math.prod(a.shape[:-1])          # explicit: an empty shard (D = 0) must work
    return a.reshape(rows, a.shape[-1])


def linear_backward_input(dy, W):
    """dx = dy @ W -> (N, ..., D)."""
    return hostblas.matmul(dy, W)


def linear_backward_weight(dy, x, r0=0, r1=None, out=None):
    """Rows ``r0:r1`` of dW: ``dW[r0:r1] = dy[:, r0:r1].T @ x`` -> (r1 - r0, D).

    Output row f of dW needs only column f of dy, so a layer can compute dW a row
    block at a time (and a data-parallel allreduce can start on finished blocks).
    ``out``: write the rows there (the GEMM's own output, no temporary).
    """
    return hostblas.matmul(_rows2(dy)[:, r0:r1].T, _rows2(x), out=out)


def linear_backward_bias(dy, r0=0, r1=None, out=None):
    """Entries ``r0:r1`` of db: ``dy[:, r0:r1].sum(0)`` -> (r1 - r0,); ``out`` as above."""
    return _rows2(dy)[:, r0:r1].sum(axis=0, out=out)


# --------------------------------------------------------------------------- #
# convolution: im2col a block of images, one batched GEMM per block (nn/im2col.py)
# --------------------------------------------------------------------------- #
def _conv_plan(x_shape, R, S, stride, padding, dilation):
    N, C, H, W = x_shape
    stride, dilation, pads = _pair(stride), _pair(dilation), normalize_padding(padding)
    Ho = conv_output_size(H, R, stride[0], *pads[0], dilation[0])
    Wo = conv_output_size(W, S, stride[1], *pads[1], dilation[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input {H}x{W} too small for kernel {R}x{S} (dilation {dilation}, "
                         f"padding {pads}): output would be {Ho}x{Wo}")
    return ConvPlan(x_shape, R, S, stride, pads, dilation, Ho, Wo)


def im2col(x, R, S, stride=1, padding=0, dilation=1):
    """Unfold (N, C, H, W) into columns (N, C*R*S, Ho*Wo) (the layout conv2d's GEMM reads).

    Returns
    -------
    col : (N, C*R*S, Ho*Wo), C-contiguous, row index c*R*S + r*S + s
    (Ho, Wo) : output size
    """
    xp = get_array_module(x)
    plan = _conv_plan(x.shape, R, S, stride, padding, dilation)
    col = xp.zeros(plan.col_shape(x.shape[0]), dtype=x.dtype)
    im2col_block(x, col, plan)
    return col.reshape(x.shape[0], -1, plan.Ho * plan.Wo), (plan.Ho, plan.Wo)


def col2im(dcol, x_shape, R, S, stride=1, padding=0, dilation=1):
    """Adjoint of :func:`im2col`: fold columns (N, C*R*S, Ho*Wo) back to (N, C, H, W),
    adding overlapping windows."""
    xp = get_array_module(dcol)
    plan = _conv_plan(x_shape, R, S, stride, padding, dilation)
    dx = xp.empty(x_shape, dtype=dcol.dtype)
    col2im_block(dcol.reshape(plan.col_shape(x_shape[0])), dx, plan)
    return dx


# A rank that owns several cores runs a 'same' stride-1 conv whose per-image products
# have at least this many multiply-adds on its OpenMP pool (_pool_kernels) instead of
# in thread shares. Classifier, batch 64, 2 threads, fresh processes here: the second
# conv (4.7 M per image) 5.1 + 9.0 -> 3.9 + 7.4 ms forward + backward, the step
# 27.7-28.7 -> 24.9-25.6 ms; the first (0.9 M per image, 27-deep products) was no
# faster (step 26.0-26.9 -> 26.4-27.1), so it keeps the shares
POOL_MIN_MACS = 1 << 21


def _pool_kernels(plan, xp, Kg, D, L):
    """The compiled kernels when this conv runs on the rank's OpenMP pool, else None.

    With several cores and oneMKL, a 'same' conv with large per-image products does
    not split its images into thread shares (:mod:`mpifc.nn.blockpool`): each block
    (one L2 of columns per core) is unfolded and folded by parallel compiled kernels
    and its products are one batched oneMKL GEMM on every core. Numba's kernels and
    oneMKL run on the same GNU OpenMP workers, which are still awake from the last
    parallel region; a share instead waited for a sleeping Python thread (0.1-0.4 ms
    per conv here) and then for the GIL between NumPy calls: the classifier's second
    conv took 4.7-5.0 ms a share forward, against 3.4 ms for the same images with
    the other core idle.
    """
    if (xp is not np or plan.flat is None or Kg * D * L < POOL_MIN_MACS
            or not blockpool.ENABLED or blockpool.width() < 2 or hostblas.lib() is None):
        return None
    return hostjit.kernels(np)


def _conv_parts(plan, N, x, Kg, D, L):
    """(images per block, thread parts, pool kernels or None) of a conv's pass: thread
    shares of L2-sized blocks, or on the pool one part of blocks an L2 per core."""
    xp = get_array_module(x)
    n = plan.block(N, x.dtype.itemsize, xp)
    pool = _pool_kernels(plan, xp, Kg, D, L)
    if pool is None:
        return n, blockpool.shares(N, x[:1].nbytes, xp), None
    return min(N, n * blockpool.width()), [(0, N)], pool


def _unfold(x, col, plan, pool):
    """im2col of a block: the parallel plane kernel on the pool, else im2col_block."""
    if pool is not None:
        im2col_planes(x, col, plan, pool)
    else:
        im2col_block(x, col, plan)


def conv2d_forward(x, W, b=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation), NCHW.

    Per block of images (L2-sized columns, :mod:`mpifc.nn.im2col`): im2col, then one
    batched GEMM ``y[i] = W2 @ col[i]`` over the block (and groups) written straight
    into the NCHW output, then the bias. The columns are not kept: backward unfolds
    each block again from x (a cache-resident copy, cheaper than storing and
    re-reading a column matrix C*R*S times the size of x's spatial map). A rank with
    several cores splits the images into thread shares (:mod:`mpifc.nn.blockpool`), or
    runs a large 'same' conv block by block on its OpenMP pool (:func:`_pool_kernels`).

    Parameters
    ----------
    x : (N, C, H, W)
    W : (K, C/G, R, S)
    b : (K,) or None
    stride, dilation : int or (h, w)
    padding : int, (ph, pw) or ((top, bottom), (left, right))
    groups : G, dividing both C and K

    Returns
    -------
    y : (N, K, Ho, Wo)
    cache : tuple for :func:`conv2d_backward`
    """
    N, C, H, Wd = x.shape
    K, Cg, R, S = W.shape
    G = int(groups)
    if C % G or K % G or Cg != C // G:
        raise ValueError(f"conv2d: input channels {C}, output channels {K} and weight {W.shape} "
                         f"do not fit groups={G}")
    xp = get_array_module(x)
    plan = _conv_plan(x.shape, R, S, stride, padding, dilation)
    L = plan.Ho * plan.Wo
    y = xp.empty((N, K, plan.Ho, plan.Wo), dtype=xp.result_type(x.dtype, W.dtype))
    Wg = W.reshape(G, K // G, Cg * R * S)
    n, parts, pool = _conv_parts(plan, N, x, K // G, Cg * R * S, L)

    def share(i0, i1):          # images i0..i1, a block at a time (one thread)
        col = None if plan.identity else workspace(("col", plan.key), plan.col_shape(n), x.dtype, xp)
        for n0 in range(i0, i1, n):
            m = min(n, i1 - n0)
            if plan.identity:
                c = xp.ascontiguousarray(x[n0:n0 + m])
            else:
                c = col[:m]
                _unfold(x[n0:n0 + m], c, plan, pool)
            yb = y[n0:n0 + m]
            hostblas.matmul(Wg, c.reshape(m, G, Cg * R * S, L), out=yb.reshape(m, G, K // G, L),
                            min_macs=None if pool is None else 0)
            if b is not None:
                yb += b.reshape(K, 1, 1)        # while the block is in cache
    blockpool.run(share, parts)
    return y, (x, W, plan, G)


def conv2d_backward(dy, cache, need_dx=True, need_db=True):
    """Gradients of :func:`conv2d_forward`, block by block as the forward:
    ``dW += dy[i] @ col[i].T``, ``dcol[i] = W2.T @ dy[i]``, dx[i] = col2im(dcol[i]).

    Parameters
    ----------
    dy : (N, K, Ho, Wo)

    Returns
    -------
    dx : (N, C, H, W) or None when ``need_dx`` is False
    dW : (K, C/G, R, S)
    db : (K,) or None when ``need_db`` is False
    """
    x, W, plan, G = cache
    xp = get_array_module(dy)
    K, Cg, R, S = W.shape
    N = x.shape[0]
    L = plan.Ho * plan.Wo
    Kg, D = K // G, Cg * R * S
    dy = xp.ascontiguousarray(dy)
    dx = xp.empty(x.shape, dtype=dy.dtype) if need_dx else None
    Wt = W.reshape(G, Kg, D).transpose(0, 2, 1)

    jit = hostjit.kernels(xp)
    n, parts, pool = _conv_parts(plan, N, x, Kg, D, L)          # as the forward
    mm = None if pool is None else 0  # oneMKL for every product on the pool

    def share(i0, i1):          # images i0..i1 (one thread): returns their dW (and db)
        ident = plan.identity
        # db per block while dy's block is in cache (not a pass of its own over dy);
        # block sums added in float64
        db = xp.zeros(K, dtype=np.float64) if need_db else None
        col = None if ident else workspace(("col", plan.key), plan.col_shape(n), x.dtype, xp)
        dWb = workspace(("dWbT", plan.key), (n, G, D, Kg), W.dtype, xp)
        dcol = None
        if need_dx and not ident:
            dcol = workspace(("dcol", plan.key), plan.col_shape(n), dy.dtype, xp)
        dW = xp.zeros((G, D, Kg), dtype=W.dtype)      # transposed: see the product below
        for n0 in range(i0, i1, n):
            m = min(n, i1 - n0)
            if ident:
                c = xp.ascontiguousarray(x[n0:n0 + m])
            else:
                c = col[:m]
                _unfold(x[n0:n0 + m], c, plan, pool)
            dyb = dy[n0:n0 + m].reshape(m, G, Kg, L)
            if need_db and jit is not None:
                jit.add_channel_sums(dy[n0:n0 + m].reshape(m, K, L), db)
            elif need_db:
                db += dyb.sum(axis=3).sum(axis=0).reshape(K)
            # dW.T = col @ dy.T: OpenBLAS ran this product at 109 GFLOP/s here and
            # dW = dy @ col.T (the same flops, the transposed operand on the
            # other side) at 90, on the classifier's second conv
            hostblas.matmul(c.reshape(m, G, D, L), dyb.transpose(0, 1, 3, 2), out=dWb[:m], min_macs=mm)
            dW += dWb[:m].sum(axis=0)
            if need_dx:         # 1x1: dcol is dx itself
                dc = dx[n0:n0 + m] if ident else dcol[:m]
                hostblas.matmul(Wt, dyb, out=dc.reshape(m, G, D, L), min_macs=mm)
                if pool is not None:
                    col2im_planes(dc, dx[n0:n0 + m], plan, pool)
                elif not ident:
                    col2im_block(dc, dx[n0:n0 + m], plan)
        return dW, db
    done = blockpool.run(share, parts)
    dWT = sum(p[0] for p in done)
    db = sum(p[1] for p in done).astype(dy.dtype) if need_db else None
    return dx, xp.ascontiguousarray(dWT.transpose(0, 2, 1)).reshape(W.shape), db


# --------------------------------------------------------------------------- #
# pooling: a loop over the R*S window offsets, each a vectorised strided op
# --------------------------------------------------------------------------- #
def _pool_geometry(x_shape, kernel, stride, padding):
    N, C, H, W = x_shape
    R, S = _pair(kernel)
    sh, sw = _pair(stride if stride is not None else kernel)
    pads = normalize_padding(padding)
    Ho = conv_output_size(H, R, sh, *pads[0])
    Wo = conv_output_size(W, S, sw, *pads[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"pool: input {H}x{W} too small for kernel {R}x{S}, padding {pads}")
    return R, S, sh, sw, pads, Ho, Wo


def _maxpool_tiles(R, S, sh, sw, pads):
    """True when the windows tile the input without overlap or padding (stride == kernel)."""
    return (sh, sw) == (R, S) and pads == ((0, 0), (0, 0)) and R * S < 256


def _select_where(idx, better, k):
    """``idx[better] = k`` (int k) as ``idx += better * (k - idx)``: wraps in the unsigned
    type and back, so exact; 5x faster than putmask or where on these arrays."""
    xp = get_array_module(idx)
    d = xp.subtract(idx.dtype.type(k), idx)
    d *= better
    idx += d


def _maxpool_tiled(x, R, S, Ho, Wo):
    """Max and first-maximum offset of non-overlapping R x S windows, in two stages.

    Stage 1 reduces each window row over its S columns (keeping the winning column),
    stage 2 reduces those row maxima over the R rows (keeping the winning row): the
    passes of stage 2 run on 1/S of the data, on contiguous rows. Strict ">" at both
    stages keeps the first maximum in raster order (earliest row, then earliest
    column within it), as the generic loop does.
    """
    xp = get_array_module(x)
    xs = x[:, :, :Ho * R, :Wo * S]
    m = xs[..., 0::S]
    col = None
    for s in range(1, S):
        v = xs[..., s::S]
        better = v > m
        if col is None:                               # column 0 or 1: the mask itself
            col = better.view(np.uint8)
        else:
            _select_where(col, better, s)
        m = xp.maximum(m, v)                          # (N, C, Ho*R, Wo)
    if col is None:
        col = xp.zeros(m.shape, dtype=np.uint8)
    y, idx = m[:, :, 0::R], col[:, :, 0::R]
    for r in range(1, R):
        v = m[:, :, r::R]
        better = v > y
        d = xp.subtract(col[:, :, r::R] + np.uint8(r * S), idx)   # idx[better] = r*S + col
        d *= better
        idx = idx + d
        y = xp.maximum(y, v)
    return y, idx


def maxpool2d_forward(x, kernel, stride=None, padding=0):
    """Max pooling, NCHW; padded positions never win (they are -inf).

    Parameters
    ----------
    x : (N, C, H, W)
    kernel, stride : int or (h, w); stride defaults to kernel
    padding : int, (ph, pw) or ((top, bottom), (left, right))

    Returns
    -------
    y : (N, C, Ho, Wo)
    cache : for :func:`maxpool2d_backward` (argmax offset per output, uint8/int16)
    """
    xp = get_array_module(x)
    R, S, sh, sw, pads, Ho, Wo = _pool_geometry(x.shape, kernel, stride, padding)
    if _maxpool_tiles(R, S, sh, sw, pads):
        N, C = x.shape[:2]
        y = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
        idx = xp.empty((N, C, Ho, Wo), dtype=np.uint8)
        jit = hostjit.kernels(xp, x.nbytes) if hostjit.contiguous(x) else None
        if jit is not None:
            if (R, S) == (2, 2):
                jit.maxpool2x2_forward(x, y, idx)
            else:
                jit.maxpool_tiled_forward(x, R, S, y, idx)
            return y, (idx, x.shape, (R, S, sh, sw, pads))

        def block(i0, i1):      # the stage-1 maxima of a block stay in cache for stage 2
            y[i0:i1], idx[i0:i1] = _maxpool_tiled(x[i0:i1], R, S, Ho, Wo)
        blockpool.for_each_block(block, N, x[:1].nbytes, xp)
        return y, (idx, x.shape, (R, S, sh, sw, pads))
    xpad = _pad(x, pads, value=-np.inf)
    y = None
    idx = xp.zeros((x.shape[0], x.shape[1], Ho, Wo), dtype=np.uint8 if R * S < 256 else np.int32)
    for r in range(R):
        for s in range(S):
            hs, ws = _window_slices(r, s, 1, 1, sh, sw, Ho, Wo)
            v = xpad[:, :, hs, ws]
            if y is None:
                y = v.copy()
                continue
            better = v > y                  # strict: the first maximum wins (ties -> earliest)
            _select_where(idx, better, r * S + s)
            xp.maximum(y, v, out=y)
    return y, (idx, x.shape, (R, S, sh, sw, pads))


def maxpool2d_backward(dy, cache):
    """Gradient of :func:`maxpool2d_forward`: route dy to the argmax of each window.

    The routing is ``dy * (idx == k)`` per window offset k (eight times faster than
    ``where(idx == k, dy, 0)`` here): a non-finite dy therefore also reaches the other
    positions of its window, as NaN.

    Returns
    -------
    dx : (N, C, H, W)
    """
    xp = get_array_module(dy)
    idx, x_shape, (R, S, sh, sw, pads) = cache
    N, C, H, W = x_shape
    (t, b), (l, r_) = pads
    Ho, Wo = dy.shape[2:]
    covered = t == b == l == r_ == 0 and (sh, sw) == (R, S) and (Ho * R, Wo * S) == (H, W)
    # windows that tile the input exactly write every pixel once: no zero fill
    if _maxpool_tiles(R, S, sh, sw, pads) and hostjit.contiguous(dy, idx):
        jit = hostjit.kernels(xp, dy.nbytes * R * S)
        if jit is not None:
            dx = xp.empty(x_shape, dtype=dy.dtype)
            if (R, S) == (2, 2) and covered:
                jit.maxpool2x2_backward(dy, idx, dx)
            else:
                jit.maxpool_tiled_backward(dy, idx, R, S, dx)
            return dx
    dxp = (xp.empty if covered else xp.zeros)((N, C, H + t + b, W + l + r_), dtype=dy.dtype)
    if sh >= R and sw >= S:
        # windows do not overlap: each padded pixel receives from at most one output
        def block(i0, i1):
            for r in range(R):
                for s in range(S):
                    hs, ws = _window_slices(r, s, 1, 1, sh, sw, Ho, Wo)
                    xp.multiply(dy[i0:i1], idx[i0:i1] == r * S + s, out=dxp[i0:i1, :, hs, ws])
        blockpool.for_each_block(block, N, dxp[:1].nbytes, xp)
    else:
        for r in range(R):
            for s in range(S):
                hs, ws = _window_slices(r, s, 1, 1, sh, sw, Ho, Wo)
                dxp[:, :, hs, ws] += dy * (idx == r * S + s)
    if t == b == l == r_ == 0:
        return dxp
    return xp.ascontiguousarray(dxp[:, :, t:t + H, l:l + W])


def _avgpool_divisor(xp, x_shape, R, S, sh, sw, pads, Ho, Wo, count_include_pad, dtype):
    if count_include_pad:
        return None
    N, C, H, W = x_shape
    (t, b), (l, r_) = pads
    # number of real (non-padding) pixels in each window, per output row / column
    oh = xp.arange(Ho) * sh - t
    ow = xp.arange(Wo) * sw - l
    nh = xp.minimum(oh + R, H) - xp.maximum(oh, 0)
    nw = xp.minimum(ow + S, W) - xp.maximum(ow, 0)
    return (nh[:, None] * nw[None, :]).astype(dtype)


def avgpool2d_forward(x, kernel, stride=None, padding=0, count_include_pad=True):
    """Average pooling, NCHW (padding counts as zeros unless ``count_include_pad`` is False).

    Returns
    -------
    y : (N, C, Ho, Wo)
    cache : for :func:`avgpool2d_backward`
    """
    xp = get_array_module(x)
    R, S, sh, sw, pads, Ho, Wo = _pool_geometry(x.shape, kernel, stride, padding)
    xpad = _pad(x, pads)
    y = None
    for r in range(R):
        for s in range(S):
            hs, ws = _window_slices(r, s, 1, 1, sh, sw, Ho, Wo)
            if y is None:
                y = xpad[:, :, hs, ws].copy()
            else:
                y += xpad[:, :, hs, ws]
    div = _avgpool_divisor(xp, x.shape, R, S, sh, sw, pads, Ho, Wo, count_include_pad, x.dtype)
    if div is None:
        y *= 1.0 / (R * S)
    else:
        y /= div
    return y, (x.shape, (R, S, sh, sw, pads), div)


def avgpool2d_backward(dy, cache):
    """Gradient of :func:`avgpool2d_forward`: spread dy/count over each window.

    Returns
    -------
    dx : (N, C, H, W)
    """
    xp = get_array_module(dy)
    x_shape, (R, S, sh, sw, pads), div = cache
    N, C, H, W = x_shape
    (t, b), (l, r_) = pads
    Ho, Wo = dy.shape[2:]
    g = dy * (1.0 / (R * S)) if div is None else dy / div
    g = g.astype(dy.dtype, copy=False)
    dxp = xp.zeros((N, C, H + t + b, W + l + r_), dtype=dy.dtype)
    for r in range(R):
        for s in range(S):
            hs, ws = _window_slices(r, s, 1, 1, sh, sw, Ho, Wo)
            dxp[:, :, hs, ws] += g
    return xp.ascontiguousarray(dxp[:, :, t:t + H, l:l + W])


def global_avgpool2d_forward(x):
    """Mean over H and W. x : (N, C, H, W) -> y : (N, C)."""
    return x.mean(axis=(2, 3))


def global_avgpool2d_backward(dy, x_shape):
    """dy : (N, C) -> dx : (N, C, H, W), each pixel gets dy / (H*W)."""
    xp = get_array_module(dy)
    N, C, H, W = x_shape
    g = (dy * (1.0 / (H * W))).astype(dy.dtype, copy=False)
    return xp.broadcast_to(g[:, :, None, None], x_shape).copy()


# --------------------------------------------------------------------------- #
# batch normalisation, split at the per-channel sums
# --------------------------------------------------------------------------- #
def _bn_axes(x):
    """Reduction axes: all but the channel axis 1. (N, C) -> (0,), (N, C, H, W) -> (0, 2, 3)."""
    return (0,) + tuple(range(2, x.ndim))


def _bn_view(v, ndim):
    """A per-channel (C,) vector shaped to broadcast against (N, C, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _bn_rows3(x):
    """(N, C) -> (N, C, 1); (N, C, ...) -> (N, C, L): a view (0 rows work too)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _bn_shift(x):
    """Per-channel shift k : (C,) in x.dtype: the mean of the first sample's values.

    Any value near the channel's data will do; this one costs 1/N of a pass. Zeros
    when this rank has no data.
    """
    xp = get_array_module(x)
    x3 = _bn_rows3(x)
    if x3.shape[0] == 0 or x3.shape[2] == 0:
        return xp.zeros(x.shape[1], dtype=x.dtype)
    return x3[0].mean(axis=1)


# Element-wise BN passes run per block of samples (BN_BLOCK_BYTES of x) through one
# cache-resident scratch array: only y (forward) and dx (backward) are written to
# main memory, and neither x - k nor xhat is ever stored whole (backward recomputes
# d = x - k per block from the forward input, which the cache keeps by reference).
BN_BLOCK_BYTES = 1 << 19


def _bn_blocks(x3):
    """Slices of axis 0 of (N, C, L) with about BN_BLOCK_BYTES each (one block on a GPU)."""
    xp = get_array_module(x3)
    N = x3.shape[0]
    per = max(1, x3[:1].nbytes)
    n = N if xp is not np else max(1, min(N, BN_BLOCK_BYTES // per))
    return [slice(i, min(i + n, N)) for i in range(0, N, n)] or [slice(0, 0)], max(n, 1)


# the compiled kernels (mpifc.nn.hostjit) sum each channel over n and l in one loop:
# worth it from rows of this many values (an (N, C) BatchNorm1d has rows of 1)
BN_JIT_MIN_ROW = 16


def _bn_jit(xp, *arrays3):
    """The compiled kernels for these (N, C, L) arrays, or None (NumPy then)."""
    if arrays3[0].shape[2] < BN_JIT_MIN_ROW or not hostjit.contiguous(*arrays3):
        return None
    return hostjit.kernels(xp, arrays3[0].nbytes)


def _bn_shares(x3, xp):
    """blockpool's thread shares of the samples of x3 : (N, C, L) for a BatchNorm pass."""
    return blockpool.shares(x3.shape[0], x3[:1].nbytes, xp, blockpool.PASS_MIN_SHARE_BYTES)


def batchnorm_stats(x, return_shifted=False):
    """Per-channel moments of this rank's data: (mean, M2, count), exact for any offset.

    The sums over x see only the deviations d = x - k from a per-channel shift k
    (:func:`_bn_shift`), so they keep their precision when |mean| >> std (the
    one-pass E[x^2] - mean^2 in float32 loses all of it: an input offset of 1e4
    gave an output error of 876). d lives one block at a time in a cache-resident
    scratch array; block sums are added in float64. A synced BatchNorm merges the
    moments of its ranks in one allreduce of :func:`batchnorm_moments_to_sums`.

    Parameters
    ----------
    x : (N, C), (N, C, L) or (N, C, H, W)
    return_shifted : also return the shift k : (C,) (x.dtype), which the forward reuses

    Returns
    -------
    mean : (C,) float64 mean of x over all axes but 1
    m2 : (C,) float64 sum of (x - mean)**2
    count : int, elements per channel (N or N*L or N*H*W)
    k : only with ``return_shifted``
    """
    xp = get_array_module(x)
    count = x.shape[0] * math.prod(x.shape[2:])
    k = _bn_shift(x)
    x3 = _bn_rows3(x)
    kv = k.reshape(-1, 1)
    jit = _bn_jit(xp, x3)
    if jit is not None:
        sd, sdd = np.empty(x.shape[1]), np.empty(x.shape[1])
        jit.bn_sums(x3, k, sd, sdd)
        parts = [(sd, sdd)]

    def share(i0, i1):
        blocks, n = _bn_blocks(x3[i0:i1])
        d = workspace("bn.d", (n,) + x3.shape[1:], x.dtype, xp)
        sd = xp.zeros(x.shape[1], dtype=np.float64)
        sdd = xp.zeros(x.shape[1], dtype=np.float64)
        for blk in blocks:
            db = d[:blk.stop - blk.start]
            xp.subtract(x3[i0:i1][blk], kv, out=db)
            # (n, C, L): a sum and a batched dot over the contiguous L axis, one read each
            sd += xp.einsum("ncl->c", db)
            sdd += xp.einsum("ncl,ncl->c", db, db)
        return sd, sdd
    if jit is None:
        parts = blockpool.run(share, _bn_shares(x3, xp))
    sd, sdd = sum(p[0] for p in parts), sum(p[1] for p in parts)
    n_ = max(count, 1)
    mean = k.astype(np.float64) + sd / n_
    m2 = xp.maximum(sdd - sd * sd / n_, 0.0)
    return (mean, m2, count, k) if return_shifted else (mean, m2, count)


def batchnorm_moments_to_sums(mean, m2, count):
    """(mean, M2, n) -> float64 power sums (sum x, sum x**2), which add over ranks.

    Summing (n_r*m_r, M2_r + n_r*m_r**2) over ranks and converting back with
    :func:`batchnorm_sums_to_moments` is Chan's parallel merge of (count, mean, M2)
    written as sums: ONE allreduce. In float64 the merged M2/n is off by about
    1e-16 * mean**2 (1e-8 at |mean| = 1e4 for unit variance): far below float32's
    resolution; a float64 model with |mean|/std > 1e4 would see it.
    """
    return count * mean, m2 + count * mean * mean


def _at_least_1(count, xp):
    """max(count, 1) for a count that is a number or a 0-d array (a count merged over
    ranks stays on the device: reading it back would cost a scalar read per step)."""
    return max(count, 1) if isinstance(count, (int, float)) else xp.maximum(count, 1)


def batchnorm_sums_to_moments(s, ss, count):
    """Inverse of :func:`batchnorm_moments_to_sums` (M2 clamped at 0)."""
    xp = get_array_module(s)
    mean = s / _at_least_1(count, xp)
    return mean, xp.maximum(ss - count * mean * mean, 0.0)


def batchnorm_forward_from_stats(x, gamma, beta, mean, m2, count, eps=1e-5, shifted=None,
                                 relu=False):
    """Normalise with given (possibly merged over ranks) moments; biased batch variance.

    Parameters
    ----------
    x : (N, C) or (N, C, H, W)
    gamma, beta : (C,)
    mean, m2, count : from :func:`batchnorm_stats` (merged over ranks for a synced BN)
    shifted : the shift k from ``batchnorm_stats(x, return_shifted=True)`` (computed
        here when None)
    relu : also apply the ReLU that follows (mpifc.nn.fuse): y = max(BN(x), 0), in the
        same pass with the compiled kernels, and return its mask last

    Returns
    -------
    y : same shape as x
    cache : for :func:`batchnorm_backward_stats` / :func:`batchnorm_backward_from_stats`
    mean, var : (C,) float64 batch mean and biased variance m2/count (running statistics)
    mask : with ``relu`` only: BN(x) > 0, for the ReLU's backward

    Notes
    -----
    y = d * a + c with d = x - k (exact: k is near the data), a = gamma * invstd and
    c = beta - (mean - k) * a: the float32 arithmetic sees d and the small mean - k,
    not x and a mean rounded to float32 (at an offset of 1e4 that rounding alone is
    5e-4 of the output). One block at a time: d in cache, y written once.
    """
    xp = get_array_module(x)
    mean = xp.asarray(mean, dtype=np.float64)
    var = xp.asarray(m2, dtype=np.float64) / _at_least_1(count, xp)
    invstd64 = 1.0 / xp.sqrt(var + eps)
    k = shifted if shifted is not None else _bn_shift(x)
    dt = x.dtype
    mk64 = mean - k.astype(np.float64)
    a64 = gamma.astype(np.float64) * invstd64
    a = a64.astype(dt).reshape(-1, 1)
    c = (beta.astype(np.float64) - mk64 * a64).astype(dt).reshape(-1, 1)
    x3 = _bn_rows3(x)
    y = xp.empty(x.shape, dtype=dt)
    y3 = _bn_rows3(y)
    kv = k.reshape(-1, 1)
    jit = _bn_jit(xp, x3)
    mask = xp.empty(x.shape, dtype=bool) if relu and jit is not None else None
    if mask is not None:
        jit.bn_normalise_relu(x3, k, a.ravel(), c.ravel(), y3, _bn_rows3(mask))
    elif jit is not None:
        jit.bn_normalise(x3, k, a.ravel(), c.ravel(), y3)

    def share(i0, i1):
        blocks, n = _bn_blocks(x3[i0:i1])
        d = workspace("bn.d", (n,) + x3.shape[1:], dt, xp)
        xs, ys = x3[i0:i1], y3[i0:i1]
        for blk in blocks:
            db = d[:blk.stop - blk.start]
            xp.subtract(xs[blk], kv, out=db)
            xp.multiply(db, a, out=ys[blk])
            ys[blk] += c
    if jit is None:
        blockpool.run(share, _bn_shares(x3, xp))
    cache = (x, k, mk64.astype(dt), invstd64.astype(dt), gamma)
    if not relu:
        return y, cache, mean, var
    if mask is None:
        y, mask = relu_forward(y)
    return y, cache, mean, var, mask


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Inference BatchNorm with running statistics: one fused scale/shift.

    Returns
    -------
    y : same shape as x
    cache : for :func:`batchnorm_backward_eval`
    """
    nd = x.ndim
    invstd = 1.0 / (running_var + eps) ** 0.5
    scale = gamma * invstd
    # (x - mean) * scale + beta, not x * scale + (beta - mean * scale): the latter
    # cancels two large terms in float32 when |mean| >> std
    y = x - _bn_view(running_mean, nd)
    y *= _bn_view(scale, nd)
    y += _bn_view(beta, nd)
    return y, (x, running_mean, invstd, scale)


def batchnorm_backward_eval(dy, cache):
    """Gradients of :func:`batchnorm_forward_eval` (the statistics are constants).

    Returns
    -------
    dx, dgamma, dbeta
    """
    x, mean, invstd, scale = cache
    nd = dy.ndim
    axes = _bn_axes(dy)
    dx = dy * _bn_view(scale, nd)
    xhat = (x - _bn_view(mean, nd)) * _bn_view(invstd, nd)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def batchnorm_backward_stats(dy, cache, mask=None):
    """Per-channel sums of the backward pass that a synced BatchNorm allreduces.

    sum(dy * xhat) = invstd * (sum(dy * d) - (mean - k) * sum(dy)), d = x - k one block
    at a time (xhat is not stored).

    ``mask``: the mask of a ReLU fused after the BatchNorm (``relu=True`` forward): the
    sums are those of dy * mask, the gradient the ReLU's backward would pass on.

    Returns
    -------
    sum_dy : (C,)           (= dbeta on this rank)
    sum_dy_xhat : (C,)      (= dgamma on this rank)
    """
    xp = get_array_module(dy)
    x, k, mk, invstd, _ = cache
    x3, dy3 = _bn_rows3(x), _bn_rows3(dy)
    kv = k.reshape(-1, 1)
    acc = np.float64 if dy.dtype == np.float32 else dy.dtype
    jit = _bn_jit(xp, x3, dy3) if acc == np.float64 else None
    if mask is not None and jit is None:
        dy = relu_backward(dy, mask)
        dy3 = _bn_rows3(dy)
    if jit is not None:
        sdy, sdyd = np.empty(x.shape[1]), np.empty(x.shape[1])
        if mask is None:
            jit.bn_backward_sums(x3, dy3, k, sdy, sdyd)
        else:
            jit.bn_backward_sums_masked(x3, dy3, _bn_rows3(mask), k, sdy, sdyd)
        parts = [(sdy, sdyd)]

    def share(i0, i1):
        blocks, n = _bn_blocks(x3[i0:i1])
        d = workspace("bn.d", (n,) + x3.shape[1:], x.dtype, xp)
        xs, dys = x3[i0:i1], dy3[i0:i1]
        sdy = xp.zeros(x.shape[1], dtype=acc)
        sdyd = xp.zeros(x.shape[1], dtype=acc)
        for blk in blocks:
            db = d[:blk.stop - blk.start]
            xp.subtract(xs[blk], kv, out=db)
            sdy += xp.einsum("ncl->c", dys[blk])
            sdyd += xp.einsum("ncl,ncl->c", dys[blk], db)
        return sdy, sdyd
    if jit is None:
        parts = blockpool.run(share, _bn_shares(x3, xp))
    sdy, sdyd = sum(p[0] for p in parts), sum(p[1] for p in parts)
    sdx = (sdyd - mk.astype(acc) * sdy) * invstd.astype(acc)
    return sdy.astype(dy.dtype), sdx.astype(dy.dtype)


def batchnorm_backward_from_stats(dy, cache, sum_dy, sum_dy_xhat, count, mask=None):
    """Input gradient from (possibly allreduced) backward sums.

    dx = gamma * invstd * (dy - sum_dy/count - xhat * sum_dy_xhat/count), with
    xhat = (d - (mean - k)) * invstd folded in: dx = a*dy - e*d + f per block
    (a = gamma*invstd, e = a*invstd*sum_dy_xhat/count, f = e*(mean-k) - a*sum_dy/count).

    Parameters
    ----------
    dy : (N, C) or (N, C, H, W)
    sum_dy, sum_dy_xhat : (C,), from :func:`batchnorm_backward_stats`
    count : total elements per channel the forward statistics were taken over
    mask : a fused ReLU's mask (see :func:`batchnorm_backward_stats`)

    Returns
    -------
    dx : same shape as dy
    """
    xp = get_array_module(dy)
    x, k, mk, invstd, gamma = cache
    dt = dy.dtype
    a64 = gamma.astype(np.float64) * invstd.astype(np.float64)
    e64 = a64 * invstd.astype(np.float64) * sum_dy_xhat.astype(np.float64) / count
    f64 = e64 * mk.astype(np.float64) - a64 * sum_dy.astype(np.float64) / count
    a, e, f = (v.astype(dt).reshape(-1, 1) for v in (a64, e64, f64))
    x3, dy3 = _bn_rows3(x), _bn_rows3(dy)
    dx = xp.empty(dy.shape, dtype=dt)
    dx3 = _bn_rows3(dx)
    kv = k.reshape(-1, 1)
    jit = _bn_jit(xp, x3, dy3)
    if jit is not None and mask is not None:
        jit.bn_backward_dx_masked(x3, dy3, _bn_rows3(mask), k, a.ravel(), e.ravel(), f.ravel(), dx3)
        return dx
    if jit is not None:
        jit.bn_backward_dx(x3, dy3, k, a.ravel(), e.ravel(), f.ravel(), dx3)
        return dx
    if mask is not None:
        dy = relu_backward(dy, mask)
        dy3 = _bn_rows3(dy)

    def share(i0, i1):
        blocks, n = _bn_blocks(x3[i0:i1])
        d = workspace("bn.d", (n,) + x3.shape[1:], dt, xp)
        xs, dys, dxs = x3[i0:i1], dy3[i0:i1], dx3[i0:i1]
        for blk in blocks:
            db = d[:blk.stop - blk.start]
            xp.subtract(xs[blk], kv, out=db)
            db *= e
            xp.multiply(dys[blk], a, out=dxs[blk])
            dxs[blk] -= db
            dxs[blk] += f
    blockpool.run(share, _bn_shares(x3, xp))
    return dx


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode BatchNorm on one rank: stats, then normalise.

    Returns
    -------
    y, cache, mean, var  (see :func:`batchnorm_forward_from_stats`); cache ends with count
    """
    mean, m2, count, shifted = batchnorm_stats(x, return_shifted=True)
    y, cache, mean, var = batchnorm_forward_from_stats(x, gamma, beta, mean, m2, count, eps, shifted)
    return y, cache + (count,), mean, var


def batchnorm_backward(dy, cache):
    """Gradients of :func:`batchnorm_forward`.

    Returns
    -------
    dx, dgamma, dbeta
    """
    count = cache[-1]
    sum_dy, sum_dy_xhat = batchnorm_backward_stats(dy, cache[:-1])
    dx = batchnorm_backward_from_stats(dy, cache[:-1], sum_dy, sum_dy_xhat, count)
    return dx, sum_dy_xhat, sum_dy


# --------------------------------------------------------------------------- #
# layer normalisation over the trailing axes
# --------------------------------------------------------------------------- #
def layernorm_forward(x, gamma, beta, n_axes=1, eps=1e-5):
    """Normalise over the last ``n_axes`` axes.

    Parameters
    ----------
    x : (..., *E) where E = gamma.shape (the normalised shape)
    gamma, beta : E

    Returns
    -------
    y : same shape as x
    cache : for :func:`layernorm_backward`
    """
    axes = tuple(range(x.ndim - n_axes, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=axes, keepdims=True)
    invstd = 1.0 / (var + eps) ** 0.5
    xhat = xc * invstd
    y = xhat * gamma + beta
    return y, (xhat, invstd, gamma, axes)


def layernorm_backward(dy, cache):
    """Gradients of :func:`layernorm_forward`.

    Returns
    -------
    dx : same shape as dy
    dgamma, dbeta : E
    """
    xhat, invstd, gamma, axes = cache
    lead = tuple(range(dy.ndim - len(axes)))
    dgamma = (dy * xhat).sum(axis=lead)
    dbeta = dy.sum(axis=lead)
    g = dy * gamma
    m = 1
    for a in axes:
        m *= dy.shape[a]
    dx = invstd * (g - g.mean(axis=axes, keepdims=True)
                   - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- #
# activations (elementwise)
# --------------------------------------------------------------------------- #
def relu_forward(x):
    """y = max(x, 0). Returns (y, mask) with mask = x > 0 for backward.

    Block by block over axis 0 (:func:`blockpool.for_each_block`): the mask pass
    reads y from cache, and a rank owning two cores runs half the blocks on each."""
    xp = get_array_module(x)
    if x.ndim == 0:
        y = xp.maximum(x, 0)
        return y, y > 0
    y = xp.empty(x.shape, dtype=x.dtype)
    mask = xp.empty(x.shape, dtype=bool)
    jit = hostjit.kernels(xp, x.nbytes) if hostjit.contiguous(x) else None
    if jit is not None:
        jit.relu_forward(x.reshape(-1), y.reshape(-1), mask.reshape(-1))
        return y, mask

    def block(i0, i1):
        xp.maximum(x[i0:i1], 0, out=y[i0:i1])
        xp.greater(y[i0:i1], 0, out=mask[i0:i1])
    blockpool.for_each_block(block, x.shape[0], x[:1].nbytes, xp)
    return y, mask


def relu_backward(dy, mask):
    """dx = dy where x > 0 (blocked and threaded as :func:`relu_forward`)."""
    xp = get_array_module(dy)
    if dy.ndim == 0 or dy.shape != mask.shape:
        return dy * mask
    dx = xp.empty(dy.shape, dtype=xp.result_type(dy.dtype, mask.dtype))
    jit = hostjit.kernels(xp, dy.nbytes) if hostjit.contiguous(dy, mask) else None
    if jit is not None:
        jit.relu_backward(dy.reshape(-1), mask.reshape(-1), dx.reshape(-1))
        return dx

    def block(i0, i1):
        xp.multiply(dy[i0:i1], mask[i0:i1], out=dx[i0:i1])
    blockpool.for_each_block(block, dy.shape[0], dy[:1].nbytes, xp)
    return dx


def leaky_relu_forward(x, slope=0.01):
    """y = x if x > 0 else slope*x. Returns (y, mask)."""
    xp = get_array_module(x)
    mask = x > 0
    return xp.where(mask, x, x * slope), mask


def leaky_relu_backward(dy, mask, slope=0.01):
    xp = get_array_module(dy)
    return xp.where(mask, dy, dy * slope)


_GELU_C = math.sqrt(2.0 / math.pi)


def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)), both to a few ulps for every x (no cancellation, no overflow).

    With e = exp(-|x|) in (0, 1]: sigmoid(|x|) = 1/(1+e) and sigmoid(-|x|) = e/(1+e).
    The second one is the complement 1 - sigmoid(x), computed without subtracting
    from 1, so derivatives sigmoid(x)*sigmoid(-x) keep their relative precision in
    both tails. (0.5*(1 + tanh(x/2)) is exactly 0 below x ~ -37 in float64, -17 in float32.)
    """
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    p = 1.0 / (1.0 + e)
    q = e * p
    d = p - q
    pos = x >= 0
    # select by arithmetic, not where(): mask * d is d or exactly 0, so the small value q
    # passes unchanged and the large one is q + (p - q), within 2 ulps of p. (where() on a
    # mask of random signs mispredicts its branch: 5x slower here.)
    return q + pos * d, q + (~pos) * d


def gelu_forward(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).

    The sigmoid form keeps the relative precision of the left tail (0.5 (1 + tanh(u))
    is exactly 0 below x ~ -5.5 in float32). Returns (y, cache) with cache =
    (x, sigmoid(2u), sigmoid(-2u)).
    """
    u2 = (2.0 * _GELU_C) * (x + 0.044715 * x * x * x)
    s, c = _sigmoid_pair(u2)
    return x * s, (x, s, c)


def gelu_backward(dy, cache):
    """dx = dy * (s + x * 2 s (1 - s) du/dx), with 1 - s = sigmoid(-2u) from the cache."""
    x, s, c = cache
    du = _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return dy * (s + (2.0 * x) * s * c * du)


def tanh_forward(x):
    """Returns (y, y): backward needs only the output."""
    xp = get_array_module(x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1.0 - y * y)


def sigmoid_forward(x):
    """Logistic 1/(1 + exp(-x)), accurate to a few ulps over the whole range (both tails).

    Returns (y, cache) with cache = (y, 1 - y), the complement computed as
    sigmoid(-x) (see :func:`_sigmoid_pair`), so the derivative keeps its precision
    where y rounds to 1.
    """
    y, c = _sigmoid_pair(x)
    return y, (y, c)


def sigmoid_backward(dy, cache):
    """dx = dy * y * (1 - y)."""
    y, c = cache
    return dy * y * c


def dropout_forward(x, p, rng):
    """Inverted dropout: zero with probability p, scale survivors by 1/(1-p).

    Parameters
    ----------
    x : any shape
    p : drop probability in [0, 1)
    rng : a Generator of x's backend (numpy.random.Generator or cupy.random.Generator)

    Returns
    -------
    y : same shape as x
    mask : scaled keep-mask (0 or 1/(1-p)), x.dtype
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


# --------------------------------------------------------------------------- #
# embeddings
# --------------------------------------------------------------------------- #
def embedding_forward(idx, E):
    """Row lookup. idx : (...) integer in [0, V); E : (V, D) -> y : (..., D)."""
    return E[idx]


def embedding_backward(dy, idx, V):
    """dE : (V, D), rows scatter-added (repeated indices accumulate)."""
    xp = get_array_module(dy)
    D = dy.shape[-1]
    dE = xp.zeros((V, D), dtype=dy.dtype)
    xp.add.at(dE, idx.reshape(-1), dy.reshape(-1, D))
    return dE


def embedding_bag_forward(E, idx, offsets=None, mask=None, mode="mean"):
    """Sum or mean of token vectors per bag (bag-of-words).

    Two input forms:

    * flat: ``idx`` (T,) all tokens back to back, ``offsets`` (N,) start of each
      bag in ``idx`` (bag i is ``idx[offsets[i]:offsets[i+1]]``; the last runs to T);
      empty bags give zeros.
    * padded: ``idx`` (N, L) with optional ``mask`` (N, L) bool/0-1 (True = real
      token). Masked-out positions contribute nothing; an all-masked bag gives zeros.

    Parameters
    ----------
    E : (V, D)
    mode : "sum" or "mean"

    Returns
    -------
    y : (N, D)
    cache : for :func:`embedding_bag_backward`
    """
    xp = get_array_module(E)
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    V, D = E.shape
    if offsets is not None:
        if idx.ndim != 1:
            raise ValueError("with offsets, idx must be 1-D (all tokens back to back)")
        T = idx.shape[0]
        N = offsets.shape[0]
        # the end of the last bag made where the offsets live (no host-to-device copy)
        ends = xp.concatenate([offsets[1:], xp.full(1, T, dtype=offsets.dtype)])
        counts = (ends - offsets).astype(np.int64)
        # checked on host offsets only: on a device each check is a device-to-host read
        # per call (the loader checks its batches on the host, before the copy)
        if not is_device_array(offsets) and (
                bool((counts < 0).any()) or (N and (int(offsets[0]) != 0 if T else False))):
            raise ValueError("offsets must start at 0 and be non-decreasing")
        # (T,) bag id of each token; searchsorted (not repeat with array counts) runs on CuPy too
        bag = xp.searchsorted(offsets, xp.arange(T), side="right") - 1
        weight = xp.ones(T, dtype=E.dtype)
        flat_idx = idx
    else:
        if idx.ndim != 2:
            raise ValueError("without offsets, idx must be (N, L) padded")
        N, L = idx.shape
        m = xp.ones((N, L), dtype=E.dtype) if mask is None else mask.astype(E.dtype)
        counts = m.sum(axis=1)
        bag = xp.repeat(xp.arange(N), L)
        weight = m.reshape(-1)
        flat_idx = idx.reshape(-1)
    if mode == "mean":
        c = xp.maximum(counts, 1).astype(E.dtype)
        weight = weight / c[bag]
    y = xp.zeros((N, D), dtype=E.dtype)
    xp.add.at(y, bag, E[flat_idx] * weight[:, None])
    return y, (flat_idx, bag, weight, V)


def embedding_bag_backward(dy, cache):
    """dE : (V, D) from dy : (N, D)."""
    xp = get_array_module(dy)
    flat_idx, bag, weight, V = cache
    dE = xp.zeros((V, dy.shape[1]), dtype=dy.dtype)
    xp.add.at(dE, flat_idx, dy[bag] * weight[:, None])
    return dE


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def log_softmax(z, axis=-1):
    """Stable log-softmax: z - max - log(sum(exp(z - max)))."""
    xp = get_array_module(z)
    m = z.max(axis=axis, keepdims=True)
    zs = z - m
    return zs - xp.log(xp.exp(zs).sum(axis=axis, keepdims=True))


def softmax_cross_entropy_forward(logits, target, label_smoothing=0.0, ignore_index=-100):
    """Mean softmax cross-entropy over the non-ignored rows.

    With smoothing e the target distribution is (1-e)*onehot + e/Q.

    Parameters
    ----------
    logits : (N, Q)
    target : (N,) integer class ids; rows equal to ``ignore_index`` are skipped

    Returns
    -------
    loss : 0-d array (0 when every row is ignored)
    cache : for :func:`softmax_cross_entropy_backward`
    """
    xp = get_array_module(logits)
    N, Q = logits.shape
    if target.shape != (N,):
        raise ValueError(f"target shape {target.shape} does not match logits {logits.shape}")
    valid = target != ignore_index
    tgt = xp.where(valid, target, 0)
    outside = (tgt < 0) | (tgt >= Q)
    on_device = is_device_array(tgt)
    # host targets: an error. On a device, raising would need a device-to-host read per
    # step (the loader checks labels on the host before the copy): the rows are indexed
    # safely and the loss made NaN instead, which the trainer's check reports
    if not on_device and bool(outside.any()):
        raise ValueError(f"target class ids must be in [0, {Q}) or equal ignore_index")
    if on_device:
        tgt = xp.where(outside, 0, tgt)
    logp = log_softmax(logits)
    nll = -logp[xp.arange(N), tgt]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=1)
    n_valid = valid.sum()
    denom = xp.maximum(n_valid, 1).astype(logits.dtype)
    loss = (nll * valid).sum() / denom
    if on_device:
        loss = xp.where(outside.any(), np.nan, loss).astype(loss.dtype)   # no host copy
    return loss, (logp, tgt, valid, denom, label_smoothing)


def softmax_cross_entropy_backward(cache, dloss=1.0):
    """dlogits : (N, Q) = (softmax - target distribution) * valid / n_valid * dloss."""
    xp = get_array_module(cache[0])
    logp, tgt, valid, denom, eps = cache
    N, Q = logp.shape
    d = xp.exp(logp)
    d[xp.arange(N), tgt] -= (1.0 - eps)
    if eps:
        d -= eps / Q
    d *= (valid.astype(d.dtype) * (dloss / denom))[:, None]
    return d


def mse_forward(pred, target):
    """Mean squared error over all elements. Returns (loss, diff)."""
    diff = pred - target
    return (diff * diff).mean(), diff


def mse_backward(diff, dloss=1.0):
    """dpred = 2 (pred - target) / size * dloss."""
    return diff * (2.0 * dloss / diff.size)
