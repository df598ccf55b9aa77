"""The element-wise passes of BatchNorm, ReLU and max pooling as Numba kernels (host only).

Imported only through :mod:`mpifc.nn.hostjit`, and only when Numba is installed
(the ``fast`` extra). Each kernel is the same math as its NumPy twin in
:mod:`mpifc.nn.functional`, in one pass over memory where NumPy makes one per
operation, and parallel (``prange``) without the GIL: over channels where a
kernel sums per channel (each channel is summed by one thread in a fixed order,
so the result does not depend on the thread count), over (sample, channel)
planes or flat chunks otherwise.

Arrays are C-contiguous; BatchNorm sees (N, C, L) views. Per-channel sums are
float64 whatever the data type. ``fastmath`` is limited to reassociation and FMA
contraction (vectorised sums); NaN and infinity keep their IEEE meaning.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_FAST = {"reassoc", "contract"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FAST, nogil=True)

# elements per parallel chunk of a flat pass: 64 KiB of float32
FLAT_CHUNK = 1 << 14


# --------------------------------------------------------------------------- #
# BatchNorm: y = (x - k) * a + c; sums of d = x - k and of dy, dy * d
# --------------------------------------------------------------------------- #
@njit(**_OPTS)
def bn_sums(x, k, sd, sdd):
    """sd[c] = sum(x - k[c]), sdd[c] = sum((x - k[c])**2) over n, l; float64."""
    N, C, L = x.shape
    for c in prange(C):
        kc = k[c]
        s = 0.0
        ss = 0.0
        for n in range(N):
            for j in range(L):
                d = np.float64(x[n, c, j] - kc)
                s += d
                ss += d * d
        sd[c] = s
        sdd[c] = ss


@njit(**_OPTS)
def bn_normalise(x, k, a, c0, y):
    """y = (x - k) * a + c0 per channel (a, c0 in x's type)."""
    N, C, L = x.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        kc, ac, cc = k[c], a[c], c0[c]
        for j in range(L):
            y[n, c, j] = (x[n, c, j] - kc) * ac + cc


@njit(**_OPTS)
def bn_backward_sums(x, dy, k, sdy, sdyd):
    """sdy[c] = sum(dy), sdyd[c] = sum(dy * (x - k[c])) over n, l; float64."""
    N, C, L = x.shape
    for c in prange(C):
        kc = k[c]
        s = 0.0
        sd = 0.0
        for n in range(N):
            for j in range(L):
                g = np.float64(dy[n, c, j])
                s += g
                sd += g * np.float64(x[n, c, j] - kc)
        sdy[c] = s
        sdyd[c] = sd


@njit(**_OPTS)
def bn_backward_dx(x, dy, k, a, e, f, dx):
    """dx = a * dy - e * (x - k) + f per channel."""
    N, C, L = x.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        kc, ac, ec, fc = k[c], a[c], e[c], f[c]
        for j in range(L):
            dx[n, c, j] = ac * dy[n, c, j] - ec * (x[n, c, j] - kc) + fc


# BatchNorm followed by ReLU (mpifc.nn.fuse): the normalise pass also applies the ReLU
# and writes its mask; backward takes g = dy * mask (the ReLU's backward, a product as
# relu_backward's) inside both BatchNorm passes instead of a pass of its own
@njit(**_OPTS)
def bn_normalise_relu(x, k, a, c0, y, mask):
    """t = (x - k) * a + c0 per channel; y = max(t, 0) (NaN stays NaN), mask = t > 0."""
    N, C, L = x.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        kc, ac, cc = k[c], a[c], c0[c]
        xr, yr, mr = x[n, c], y[n, c], mask[n, c]
        for j in range(L):
            t = (xr[j] - kc) * ac + cc
            pos = t > 0
            yr[j] = t if (pos or t != t) else 0
            mr[j] = pos


@njit(**_OPTS)
def bn_backward_sums_masked(x, dy, mask, k, sdy, sdyd):
    """:func:`bn_backward_sums` of g = dy * mask."""
    N, C, L = x.shape
    for c in prange(C):
        kc = k[c]
        s = 0.0
        sd = 0.0
        for n in range(N):
            xr, gr, mr = x[n, c], dy[n, c], mask[n, c]
            for j in range(L):
                g = np.float64(gr[j] * mr[j])
                s += g
                sd += g * np.float64(xr[j] - kc)
        sdy[c] = s
        sdyd[c] = sd


@njit(**_OPTS)
def bn_backward_dx_masked(x, dy, mask, k, a, e, f, dx):
    """:func:`bn_backward_dx` of g = dy * mask."""
    N, C, L = x.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        kc, ac, ec, fc = k[c], a[c], e[c], f[c]
        xr, gr, mr, dr = x[n, c], dy[n, c], mask[n, c], dx[n, c]
        for j in range(L):
            dr[j] = ac * (gr[j] * mr[j]) - ec * (xr[j] - kc) + fc


# --------------------------------------------------------------------------- #
# ReLU on flat arrays, in chunks of FLAT_CHUNK (each chunk's loop vectorises)
# --------------------------------------------------------------------------- #
@njit(**_OPTS)
def relu_forward(x, y, mask):
    """y = max(x, 0) (NaN stays NaN, as np.maximum), mask = y > 0."""
    n = x.size
    for b in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo = b * FLAT_CHUNK
        hi = min(n, lo + FLAT_CHUNK)
        xs, ys, ms = x[lo:hi], y[lo:hi], mask[lo:hi]
        for i in range(hi - lo):
            v = xs[i]
            p = v > 0
            ys[i] = v if (p or v != v) else 0
            ms[i] = p


@njit(**_OPTS)
def relu_backward(dy, mask, dx):
    """dx = dy * mask (a product, as NumPy's: a non-finite dy gives NaN where mask is 0)."""
    n = dy.size
    for b in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo = b * FLAT_CHUNK
        hi = min(n, lo + FLAT_CHUNK)
        gs, ms, ds = dy[lo:hi], mask[lo:hi], dx[lo:hi]
        for i in range(hi - lo):
            ds[i] = gs[i] * ms[i]


# --------------------------------------------------------------------------- #
# max pooling over non-overlapping R x S windows (stride = kernel, no padding);
# 2 x 2 windows, the common case, have their own straight-line kernels
# --------------------------------------------------------------------------- #
@njit(**_OPTS)
def maxpool_tiled_forward(x, R, S, y, idx):
    """y[n, c, i, j] = max of window (i, j); idx = r * S + s of its first maximum in
    raster order. A window holding NaN gives NaN (as np.maximum); its idx is then
    that of the first maximum among the other values."""
    N, C, Ho, Wo = y.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        xp, yp, ip = x[n, c], y[n, c], idx[n, c]
        for i in range(Ho):
            yr, ir = yp[i], ip[i]
            for j in range(Wo):
                m = xp[i * R, j * S]
                best = 0
                bad = m != m
                for r in range(R):
                    xr = xp[i * R + r]
                    for s in range(S):
                        v = xr[j * S + s]
                        b = v > m
                        m = v if b else m
                        best = r * S + s if b else best
                        bad = bad | (v != v)
                yr[j] = m if not bad else np.nan
                ir[j] = best


@njit(**_OPTS)
def maxpool2x2_forward(x, y, idx):
    """:func:`maxpool_tiled_forward` for R = S = 2, unrolled."""
    N, C, Ho, Wo = y.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        xp, yp, ip = x[n, c], y[n, c], idx[n, c]
        for i in range(Ho):
            a, b, yr, ir = xp[2 * i], xp[2 * i + 1], yp[i], ip[i]
            for j in range(Wo):
                v0, v1, v2, v3 = a[2 * j], a[2 * j + 1], b[2 * j], b[2 * j + 1]
                m, k = v0, 0
                t = v1 > m
                m, k = (v1, 1) if t else (m, k)
                t = v2 > m
                m, k = (v2, 2) if t else (m, k)
                t = v3 > m
                m, k = (v3, 3) if t else (m, k)
                bad = (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3)
                yr[j] = m if not bad else np.nan
                ir[j] = k


@njit(**_OPTS)
def maxpool_tiled_backward(dy, idx, R, S, dx):
    """dx[window (i, j)] = dy[i, j] * (offset == idx[i, j]); rows and columns of dx
    beyond the last whole window are zero."""
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        for h in range(Ho * R, H):
            for w in range(W):
                dx[n, c, h, w] = 0
        for h in range(Ho * R):
            for w in range(Wo * S, W):
                dx[n, c, h, w] = 0
        for i in range(Ho):
            for r in range(R):
                for j in range(Wo):
                    g = dy[n, c, i, j]
                    t = idx[n, c, i, j]
                    for s in range(S):
                        dx[n, c, i * R + r, j * S + s] = g * (1 if t == r * S + s else 0)


@njit(**_OPTS)
def maxpool2x2_backward(dy, idx, dx):
    """:func:`maxpool_tiled_backward` for R = S = 2 and even H, W (every pixel written)."""
    N, C, Ho, Wo = dy.shape
    for p in prange(N * C):
        n = p // C
        c = p - n * C
        dxp, gp, ip = dx[n, c], dy[n, c], idx[n, c]
        for i in range(Ho):
            g, t, a, b = gp[i], ip[i], dxp[2 * i], dxp[2 * i + 1]
            for j in range(Wo):
                gj, tj = g[j], t[j]
                a[2 * j] = gj * (tj == 0)
                a[2 * j + 1] = gj * (tj == 1)
                b[2 * j] = gj * (tj == 2)
                b[2 * j + 1] = gj * (tj == 3)


# --------------------------------------------------------------------------- #
# col2im of a stride-1 'same' conv on flattened planes (ConvPlan.flat), the adjoint
# of im2col's shifted copies: per kernel offset q, col[.., k_q, j] came from
# x[.., j + delta_q] for j in [lo_q, hi_q), except output columns whose source column
# is padding (outside [wo0_q, wo1_q)). col2im_flat is not parallel: it runs inside
# the conv's thread shares (mpifc.nn.blockpool), a block of images at a time, and
# releases the GIL for the whole block; in a share the unfold stays NumPy's shifted
# copies (a compiled one was no faster on one thread). The *_planes pair runs a
# block's (image, channel) planes in parallel: the conv of a rank with several cores
# on its OpenMP pool (functional._pool_kernels), where no share runs.
# --------------------------------------------------------------------------- #
_SERIAL = dict(cache=True, fastmath=_FAST, nogil=True)


@njit(**_SERIAL)
def _zero_pad_columns(row, W, w0, w1):
    """Zero columns [0, w0) and [w1, W) of every W-long row of the flat ``row``."""
    L = row.size
    if w0 > 0:
        for j in range(0, L, W):
            row[j:j + w0] = 0
    if w1 < W:
        for j in range(w1, L, W):
            row[j:j + W - w1] = 0


@njit(**_SERIAL)
def col2im_flat(dcol4, dx3, ks, deltas, los, his, W, wo0s, wo1s):
    """dx3 : (n, C, H*W) = the sum over offsets of dcol4 : (n, C, R*S, Ho*Wo) added back
    at the pixels each read. Zeroes the padding columns of dcol4 (scratch) first."""
    n_, C, _ = dx3.shape
    for n in range(n_):
        for c in range(C):
            dr = dx3[n, c]
            dr[:] = 0
            for q in range(ks.size):
                lo, hi, d = los[q], his[q], deltas[q]
                cr = dcol4[n, c, ks[q]]
                _zero_pad_columns(cr, W, wo0s[q], wo1s[q])
                ds, cs = dr[lo + d:hi + d], cr[lo:hi]
                for j in range(hi - lo):
                    ds[j] += cs[j]


@njit(**_SERIAL)
def _zero_wrapped(c1, cb, L, W, w0, w1):
    """Zero columns [0, w0) and [w1, W) of the W-long rows of c1[cb:cb + L]. Index
    loops: with _zero_pad_columns' slice stores the unfold of 14 images of the
    classifier's second conv took 191-214 us on one thread here, with these 161-189."""
    for j in range(cb, cb + L, W):
        for i in range(w0):
            c1[j + i] = 0
        for i in range(w1, W):
            c1[j + i] = 0


@njit(**_OPTS)
def im2col_flat_planes(x3, col4, ks, deltas, los, his, W, wo0s, wo1s):
    """x3 : (n, C, H*W) -> col4 : (n, C, R*S, Ho*Wo) of a 'same' conv, the (image,
    channel) planes in parallel: per offset q, the run of the plane shifted by
    deltas[q], then its padding columns zeroed; entries no offset reaches are left as
    they are (zero: the column buffer is zeroed once when made)."""
    n_, C, P = x3.shape
    RS, L = col4.shape[2], col4.shape[3]
    x1, c1 = x3.reshape(n_ * C * P), col4.reshape(n_ * C * RS * L)
    for p in prange(n_ * C):
        xb = p * P
        for q in range(ks.size):
            lo, hi, d = los[q], his[q], deltas[q]
            cb = (p * RS + ks[q]) * L
            dst, src = c1[cb + lo:cb + hi], x1[xb + lo + d:xb + hi + d]
            for j in range(hi - lo):
                dst[j] = src[j]
            _zero_wrapped(c1, cb, L, W, wo0s[q], wo1s[q])


@njit(**_OPTS)
def col2im_flat_planes(dcol4, dx3, ks, deltas, los, his, W, wo0s, wo1s):
    """:func:`col2im_flat` with the (image, channel) planes in parallel."""
    n_, C, P = dx3.shape
    RS, L = dcol4.shape[2], dcol4.shape[3]
    d1, c1 = dx3.reshape(n_ * C * P), dcol4.reshape(n_ * C * RS * L)
    for p in prange(n_ * C):
        xb = p * P
        dr = d1[xb:xb + P]
        for j in range(P):
            dr[j] = 0
        for q in range(ks.size):
            lo, hi, d = los[q], his[q], deltas[q]
            cb = (p * RS + ks[q]) * L
            _zero_wrapped(c1, cb, L, W, wo0s[q], wo1s[q])
            ds, cs = d1[xb + lo + d:xb + hi + d], c1[cb + lo:cb + hi]
            for j in range(hi - lo):
                ds[j] += cs[j]


@njit(**_SERIAL)
def add_channel_sums(y, acc):
    """acc[k] += sum of y[:, k, :] (float64), y : (n, K, L): a conv's bias gradient."""
    n_, K, L = y.shape
    for k in range(K):
        s = 0.0
        for n in range(n_):
            row = y[n, k]
            for j in range(L):
                s += row[j]
        acc[k] += s


@njit(**_SERIAL)
def col2im_offsets(dcol, dx, offs, sh, sw):
    """col2im of any conv geometry: dx : (n, C, H, W) zeroed, then per kernel offset
    ``(r, s, ho0, ho1, wo0, wo1, h0, w0)`` (ConvPlan.offsets: the output rectangle whose
    input lies in the image and its first input pixel) the rectangle of
    dcol : (n, C, R, S, Ho, Wo) added at rows h0 + (ho - ho0) * sh, columns w0 + j * sw.
    Each (image, channel) plane is accumulated while it sits in L1."""
    n_, C = dx.shape[0], dx.shape[1]
    for n in range(n_):
        for c in range(C):
            dx[n, c] = 0
            for q in range(offs.shape[0]):
                r, s, ho0, ho1, wo0, wo1, h0, w0 = offs[q]
                cp = dcol[n, c, r, s]
                k = wo1 - wo0
                for ho in range(ho0, ho1):
                    dr = dx[n, c, h0 + (ho - ho0) * sh]
                    ds, cs = dr[w0:w0 + (k - 1) * sw + 1:sw], cp[ho, wo0:wo1]
                    for j in range(k):
                        ds[j] += cs[j]


# --------------------------------------------------------------------------- #
# the SGD update (mpifc.optim.SGD), one pass over p, g and the momentum b: NumPy's
# operations in NumPy's order and rounding (no FMA contraction), the scalars in the
# arrays' type as NumPy takes Python floats
# --------------------------------------------------------------------------- #
@njit(parallel=True, cache=True, nogil=True)
def sgd_update(p, g, b, lr, wd, mu, keep, nesterov, first, use_b):
    """p -= lr * d, d = g (+ wd * p); with ``use_b``: b = d (first step) or
    b = mu * b + keep * d (``keep`` = 1 - dampening; the multiply skipped when it is 1),
    then d = d + mu * b (Nesterov) or b."""
    n = p.size
    for c in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo = c * FLAT_CHUNK
        hi = min(n, lo + FLAT_CHUNK)
        ps, gs, bs = p[lo:hi], g[lo:hi], b[lo:hi]
        for i in range(hi - lo):
            d = gs[i]
            if wd != 0:
                d = d + wd * ps[i]
            if use_b:
                if first:
                    v = d
                elif keep != 1:
                    v = bs[i] * mu + keep * d
                else:
                    v = bs[i] * mu + d
                bs[i] = v
                d = d + mu * v if nesterov else v
            ps[i] = ps[i] - lr * d


@njit(parallel=True, cache=True, nogil=True)
def adam_update(p, g, m, v, wd, decay, b1, c1, b2, c2, inv_sqrt_bc2, eps, step, l2, decoupled):
    """The Adam / AdamW update (mpifc.optim.Adam), NumPy's operations in its order and
    rounding: d = g (+ wd * p when ``l2``); p *= decay when ``decoupled``;
    m = m * b1 + c1 * d; v = v * b2 + c2 * (d * d);
    p -= step * (m / (sqrt(v) * inv_sqrt_bc2 + eps))."""
    n = p.size
    for c in prange((n + FLAT_CHUNK - 1) // FLAT_CHUNK):
        lo = c * FLAT_CHUNK
        hi = min(n, lo + FLAT_CHUNK)
        ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        for i in range(hi - lo):
            d = gs[i]
            if l2:
                d = d + wd * ps[i]
            q = ps[i] * decay if decoupled else ps[i]
            mi = ms[i] * b1 + c1 * d
            vi = vs[i] * b2 + c2 * (d * d)
            ms[i] = mi
            vs[i] = vi
            ps[i] = q - step * (mi / (np.sqrt(vi) * inv_sqrt_bc2 + eps))
