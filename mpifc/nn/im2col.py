"""im2col / col2im on a block of images, written straight in the GEMM operand layout.

Shape letters: n images in a block, C channels, H x W input, R x S kernel, Ho x Wo
output, L = Ho*Wo, G groups.

Layout: ``col : (n, C, R, S, Ho, Wo)``, C-contiguous, which is ``(n, C*R*S, L)``:
image i's slice is the right operand of ``y_i = W2 @ col_i`` (W2 = W.reshape(K, C*R*S))
and ``y_i : (K, L)`` is image i of the NCHW output -- the batched GEMM writes the
output in place, with no transpose before or after it. A grouped conv is the same
batched GEMM over (n, G): ``col.reshape(n, G, C/G*R*S, L)``.

Padding is never materialised: kernel offset (r, s) copies only the rectangle of
output pixels whose input pixel lies inside the image (:class:`ConvPlan`); the rest
of ``col`` is zero. A column buffer is zeroed once when it is made and reused for
the next block (and the next step, see :func:`workspace`): the padded margins are
the same for every block, so they stay zero.

Blocking: a block's columns fit in about the L2 cache (:data:`COL_BLOCK_BYTES`), so
the copy that writes them and the GEMM that reads them meet in cache rather than in
main memory (the whole-batch column matrix of the classifier's second conv is 19 MB;
one GEMM over it ran at half the GFLOP/s of the same GEMM on a 1 MB block here).
On a GPU the whole batch is one block.
"""
from __future__ import annotations

import threading

import numpy as np

from mpifc.backend import get_array_module
from mpifc.nn import hostjit

# bytes of column buffer per block on the host: L2-sized (2 MB per core on the
# 2-core test machine). Each block costs a dozen NumPy calls, and with two thread
# shares each call may wait for the GIL: the classifier's second conv (64 images,
# 288 KiB of columns each) went at 2 threads from 4.0 + 9.9 ms forward + backward
# with 1 MiB blocks to 4.0 + 8.2 with 2 MiB (1 thread: 7.5 + 15.1 -> 6.1 + 13.7;
# 4 MiB no better, 512 KiB 2x slower); the step from 32.3 to 29.7-30.6 ms
COL_BLOCK_BYTES = 2 << 20

_local = threading.local()


def workspace(key, shape, dtype, xp):
    """A zero-filled scratch array kept per thread and ``key`` across calls.

    Only for buffers that never leave the function that asks for them. The key must
    name everything that decides which entries a caller leaves untouched (a column
    buffer's padded margins depend on the conv geometry), since those stay as the
    previous user left them.
    """
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    k = (key, tuple(shape), np.dtype(dtype).str, xp.__name__)
    buf = cache.get(k)
    if buf is None:
        buf = cache[k] = xp.zeros(shape, dtype=dtype)
    return buf


def _offset_range(r, dil, stride, pad_lo, size, n_out):
    """Outputs o whose input i = o*stride + r*dil - pad_lo lies in [0, size): (o0, o1, i-slice)."""
    first = r * dil - pad_lo
    o0 = max(0, -(first // stride)) if first < 0 else 0        # ceil(-first / stride)
    o1 = min(n_out, (size - 1 - first) // stride + 1) if size - 1 >= first else 0
    if o1 <= o0:
        return 0, 0, slice(0, 0)
    i0 = o0 * stride + first
    return o0, o1, slice(i0, i0 + stride * (o1 - o0 - 1) + 1, stride)


class ConvPlan:
    """The geometry of one conv on (N, C, H, W) input, computed once per call.

    ``offsets``: per kernel offset (r, s), the output rectangle ``(ho0, ho1, wo0, wo1)``
    it fills and the input slices ``(hs, ws)`` it reads (empty offsets are left out).
    """

    def __init__(self, x_shape, R, S, stride, padding, dilation, Ho, Wo):
        _, self.C, self.H, self.W = x_shape
        (sh, sw), ((t, _b), (l, _r)), (dh, dw) = stride, padding, dilation
        self.R, self.S, self.Ho, self.Wo = R, S, Ho, Wo
        self.stride = (sh, sw)
        self.key = (tuple(x_shape[1:]), R, S, stride, padding, dilation)
        # a 1x1 kernel, stride 1, no padding: the columns are x itself (no copy)
        self.identity = (R, S, sh, sw) == (1, 1, 1, 1) and padding == ((0, 0), (0, 0))
        self.offsets = []
        for r in range(R):
            ho0, ho1, hs = _offset_range(r, dh, sh, t, self.H, Ho)
            for s in range(S):
                wo0, wo1, ws = _offset_range(s, dw, sw, l, self.W, Wo)
                if ho1 > ho0 and wo1 > wo0:
                    self.offsets.append((r, s, ho0, ho1, wo0, wo1, hs, ws))
        # the offsets as one int64 table for the compiled col2im (mpifc.nn.hostjit)
        self.offset_table = np.array([o[:6] + (o[6].start, o[7].start) for o in self.offsets],
                                     dtype=np.int64).reshape(-1, 8)
        # a 'same' conv (stride 1, output H x W) maps an offset to one shift of the
        # flattened H*W plane: see im2col_block
        self.flat = None
        if (sh, sw) == (1, 1) and (Ho, Wo) == (self.H, self.W) and not self.identity:
            L = Ho * Wo
            self.flat = []
            for r, s, ho0, ho1, wo0, wo1, _, _ in self.offsets:
                delta = (r * dh - t) * self.W + (s * dw - l)
                pad_cols = [c for c in (slice(0, wo0), slice(wo1, Wo)) if c.stop > c.start]
                self.flat.append((r * S + s, delta, max(0, -delta), min(L, L - delta), pad_cols))
            # the same, as arrays for the compiled kernels (mpifc.nn.hostjit)
            cols = [(o[4], o[5]) for o in self.offsets]
            self.flat_args = tuple(np.array(v, dtype=np.int64) for v in (
                [f[0] for f in self.flat], [f[1] for f in self.flat], [f[2] for f in self.flat],
                [f[3] for f in self.flat])) + (self.W,) + tuple(
                np.array(v, dtype=np.int64) for v in zip(*cols))

    def block(self, N, itemsize, xp):
        """Images per block: the columns of a block fit :data:`COL_BLOCK_BYTES` (>= 1)."""
        if xp is not np:
            return max(N, 1)
        per_image = self.C * self.R * self.S * self.Ho * self.Wo * itemsize
        return max(1, min(N, COL_BLOCK_BYTES // max(per_image, 1)))

    def col_shape(self, n):
        return (n, self.C, self.R, self.S, self.Ho, self.Wo)


def im2col_block(x, col, plan):
    """Fill ``col : (n, C, R, S, Ho, Wo)`` from ``x : (n, C, H, W)``: one strided copy per
    kernel offset, into the part of the output it sees (padding entries untouched).

    A 'same' conv (:attr:`ConvPlan.flat`) copies each offset as ONE shift of the
    flattened plane, ``col[.., r, s, j] = x[.., j + delta]`` over the j whose source
    lies in the plane: rows of H*W elements instead of Ho rows of Wo (NumPy's cost
    per row dominated the 2-D copy on 16x16 maps). An output pixel whose source
    column is padding wraps to a neighbouring row's pixel there, so those columns
    are zeroed again after the copy; a pixel whose source row is padding falls
    outside [a, b) unless its column is padding too, so rows need nothing."""
    if plan.flat is not None and col.flags.c_contiguous:
        n, C = x.shape[:2]       # explicit sizes: a rank may hold 0 channels or images
        x3 = x.reshape(n, C, plan.H * plan.W)
        col4 = col.reshape(n, C, plan.R * plan.S, plan.Ho * plan.Wo)
        for k, delta, a, b, pad_cols in plan.flat:
            col4[:, :, k, a:b] = x3[:, :, a + delta:b + delta]
            for c in pad_cols:
                col[:, :, k // plan.S, k % plan.S, :, c] = 0
        return
    for r, s, ho0, ho1, wo0, wo1, hs, ws in plan.offsets:
        col[:, :, r, s, ho0:ho1, wo0:wo1] = x[:, :, hs, ws]


# the compiled col2im (mpifc.nn.hostjit) folds one (image, channel) plane at a time;
# below this many input pixels per plane NumPy's whole-block passes win (per image of
# the classifier's 32-channel conv here: 4x4 10.7 vs 5.1 us, 8x8 12.6 vs 12.3, 11x11
# 15.1 vs 21.3, 16x16 20.3 vs 38.3)
JIT_MIN_PLANE = 100


def col2im_jit(plan) -> bool:
    """True when :func:`col2im_block` of this geometry takes the compiled kernel (given
    host arrays and Numba)."""
    return plan.H * plan.W >= JIT_MIN_PLANE and not plan.identity


def _col2im_jit(dcol, dx, plan):
    if not col2im_jit(plan) or not (dx.flags.c_contiguous and dcol.flags.c_contiguous):
        return None
    return hostjit.kernels(get_array_module(dx))


def col2im_block(dcol, dx, plan):
    """Adjoint of :func:`im2col_block`: ``dx : (n, C, H, W)`` = the sum over kernel offsets
    of ``dcol`` added back at the input pixels each read (strided accumulation).

    An offset that reads every input pixel once (the centre of a stride-1 'same' conv)
    goes first and assigns, so dx is never zero-filled then added to. With the
    compiled kernels (mpifc.nn.hostjit) any geometry is folded plane by plane in one
    call (``col2im_offsets``; 2.4x faster than the strided += here on a stride-2 conv),
    from :data:`JIT_MIN_PLANE` input pixels."""
    if plan.flat is not None and dx.flags.c_contiguous and dcol.flags.c_contiguous:
        _col2im_flat(dcol, dx, plan)
        return
    jit = _col2im_jit(dcol, dx, plan)
    if jit is not None:
        jit.col2im_offsets(dcol, dx, plan.offset_table, *plan.stride)
        return
    offs = plan.offsets
    full = [o for o in offs if o[6].step == 1 and o[7].step == 1
            and (o[3] - o[2], o[5] - o[4]) == (plan.H, plan.W)]
    if full:
        r, s, ho0, ho1, wo0, wo1, _, _ = full[0]
        dx[...] = dcol[:, :, r, s, ho0:ho1, wo0:wo1]
        offs = [o for o in offs if o is not full[0]]
    else:
        dx[...] = 0
    for r, s, ho0, ho1, wo0, wo1, hs, ws in offs:
        dx[:, :, hs, ws] += dcol[:, :, r, s, ho0:ho1, wo0:wo1]



def _col2im_flat(dcol, dx, plan):
    """:func:`col2im_block` of a 'same' conv: one shifted add per offset over the
    flattened planes (the adjoint of the flat copy in :func:`im2col_block`). The
    entries of ``dcol`` whose source is padding are zeroed first (``dcol`` is
    scratch), so the pixels they wrap to receive nothing from them."""
    n, C = dx.shape[:2]
    L = plan.H * plan.W
    dx3 = dx.reshape(n, C, L)
    dcol4 = dcol.reshape(n, C, plan.R * plan.S, L)
    jit = _col2im_jit(dcol, dx, plan)
    if jit is not None:
        jit.col2im_flat(dcol4, dx3, *plan.flat_args)
        return
    for k, _, _, _, pad_cols in plan.flat:
        for c in pad_cols:
            dcol[:, :, k // plan.S, k % plan.S, :, c] = 0
    full = next((f for f in plan.flat if f[1:4] == (0, 0, L)), None)
    if full is None:
        dx3[...] = 0
    else:                        # the centre offset reads every pixel once: assign
        dx3[...] = dcol4[:, :, full[0]]
    for f in plan.flat:
        if f is not full:
            k, delta, a, b, _ = f
            dx3[:, :, a + delta:b + delta] += dcol4[:, :, k, a:b]


def im2col_planes(x, col, plan, jit):
    """:func:`im2col_block` of a 'same' conv (:attr:`ConvPlan.flat`) by the compiled
    kernel ``jit.im2col_flat_planes``: the (image, channel) planes in parallel on the
    rank's OpenMP threads (the conv of :func:`mpifc.nn.functional._pool_kernels`)."""
    n, C = x.shape[:2]
    jit.im2col_flat_planes(x.reshape(n, C, plan.H * plan.W),
                           col.reshape(n, C, plan.R * plan.S, plan.Ho * plan.Wo), *plan.flat_args)


def col2im_planes(dcol, dx, plan, jit):
    """:func:`col2im_block` of a 'same' conv by ``jit.col2im_flat_planes``, the planes in
    parallel as :func:`im2col_planes` (``dcol`` is scratch: its padding columns are zeroed)."""
    n, C = dx.shape[:2]
    jit.col2im_flat_planes(dcol.reshape(n, C, plan.R * plan.S, plan.Ho * plan.Wo),
                           dx.reshape(n, C, plan.H * plan.W), *plan.flat_args)
