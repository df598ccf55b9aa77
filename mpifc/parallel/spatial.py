"""Spatial parallelism: the image height H split over a group, one band of rows per rank.

N batch, C in channels, K out channels, H x W input, Ho x Wo output, R x S kernel,
P ranks in the spatial group, rank r owns input rows [a_r, b_r) and output rows
[p_r, q_r).

Partition rule
--------------
Every spatial layer takes its input in bands ``in_counts`` (default: balanced
counts of H, larger bands first, as :func:`mpifc.comm.balanced_counts`) and
produces its output in BALANCED bands of Ho (``balanced_counts(Ho, P)``). So a
chain of spatial layers built with default ``in_counts`` fits together with no
extra argument: each layer's output bands are the next layer's balanced input
bands. (A layer fed some other partition takes it as ``in_counts``.)

Output row i reads input rows i*s - pad_top + d*j, j = 0..R-1 (stride s,
dilation d). Rank r computes rows [p_r, q_r), so it needs input rows
[p_r*s - pad_top, (q_r-1)*s - pad_top + d*(R-1) + 1); of those, rows outside
[0, H) are the global padding (only a rank whose band touches the image border
pads), rows outside [a_r, b_r) come from its neighbours:

    forward   halo_exchange  lo_r rows from rank r-1, hi_r rows from rank r+1 (sendrecv)
    backward  halo_add       the adjoint: their gradients go back and add onto the owners

Own rows that no output of this rank reads are skipped (strided layers). Halos
may only come from the immediate neighbours; a partition where they would not
(too many ranks for the height) is refused at construction on every rank. When
no rank needs a halo (e.g. a 2x2/2 pool on even bands) no message is sent.

Weights of a spatial conv are replicated: built on the group root from the seed
and broadcast. Each rank's weight gradient covers only its band, so the full
gradient is their sum over the spatial group; the layer allreduces it itself
(one fused buffer [dW, db] in its backward phase) unless ``reduce_grads=False``,
which leaves it to the caller (e.g. a gradient allreduce over a group that
contains the spatial ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifc.backend import get_array_module
from mpifc.comm import balanced_counts
from mpifc.comm.halo import halo_add, halo_exchange
from mpifc.nn import functional as F
from mpifc.nn import init as I
from mpifc.nn._common import place, resolve_dtype, resolve_xp
from mpifc.nn.module import Parameter
from mpifc.parallel.base import ParallelModule
from mpifc.parallel.describe import conv_flops


# --------------------------------------------------------------------------- #
# the row plan: computed once per layer, the same on every rank
# --------------------------------------------------------------------------- #
def row_bands(height: int, parts: int, counts=None) -> tuple[tuple[int, int], ...]:
    """(start, stop) of every rank's band of ``height`` rows (balanced unless ``counts``)."""
    if counts is None:
        counts = balanced_counts(int(height), int(parts))[0]
    out, a = [], 0
    for c in counts:
        out.append((a, a + int(c)))
        a += int(c)
    return tuple(out)


@dataclass(frozen=True)
class RowPlan:
    """Which rows every rank owns, needs and receives, for one spatial layer (all ranks).

    in_height, out_height   H, Ho
    in_counts, out_counts   band lengths per rank (input: given; output: balanced)
    lo, hi                  halo rows rank r receives from r-1 / r+1 (0 at the borders)
    use                     (start, stop) of the rows rank r convolves, inside its
                            halo-extended block of lo + in_count + hi rows
    pad                     (top, bottom) global padding rows rank r applies
    """

    in_height: int
    out_height: int
    in_counts: tuple[int, ...]
    out_counts: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    use: tuple[tuple[int, int], ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return len(self.in_counts)

    @property
    def any_halo(self) -> bool:
        """True when some rank needs a neighbour's rows (then every rank joins the exchange)."""
        return any(self.lo) or any(self.hi)

    def in_rows(self, r: int) -> tuple[int, int]:
        """Global input rows [start, stop) rank ``r`` owns."""
        return row_bands(self.in_height, self.size, self.in_counts)[r]

    def out_rows(self, r: int) -> tuple[int, int]:
        """Global output rows [start, stop) rank ``r`` computes."""
        return row_bands(self.out_height, self.size, self.out_counts)[r]


def plan_rows(in_height, kernel, stride, pad_top, pad_bottom, dilation, parts, in_counts=None,
              what="spatial layer") -> RowPlan:
    """The :class:`RowPlan` of a conv/pool window (one axis) over ``parts`` bands.

    Raises ValueError (the same on every rank: it depends only on the arguments) when
    the output is empty or a rank would need rows beyond its immediate neighbours.
    """
    H, R, s, d = int(in_height), int(kernel), int(stride), int(dilation)
    pt, pb, P = int(pad_top), int(pad_bottom), int(parts)
    if in_counts is None:
        in_counts = balanced_counts(H, P)[0]
    in_counts = tuple(int(c) for c in in_counts)
    if len(in_counts) != P or sum(in_counts) != H or min(in_counts) < 0:
        raise ValueError(f"{what}: in_counts {in_counts} must have {P} entries >= 0 summing to "
                         f"the input height {H}")
    Ho = F.conv_output_size(H, R, s, pt, pb, d)
    if Ho <= 0:
        raise ValueError(f"{what}: input height {H} too small for kernel {R} (dilation {d}, "
                         f"padding {pt},{pb})")
    out_counts = balanced_counts(Ho, P)[0]
    ins, outs = row_bands(H, P, in_counts), row_bands(Ho, P, out_counts)
    lo, hi, use, pad = [], [], [], []
    for r, ((a, b), (p, q)) in enumerate(zip(ins, outs)):
        if q == p:                                   # no output rows: needs nothing
            lo.append(0), hi.append(0), use.append((0, 0)), pad.append((0, 0))
            continue
        n0 = p * s - pt                              # first row a window reads (< 0: padding)
        n1 = (q - 1) * s - pt + d * (R - 1) + 1      # one past the last one (>= H: padding)
        # the real rows the windows read: with dilation, rows at the ends of the hull
        # [n0, n1) may be skipped (and may belong to a non-neighbour); O(rows * R), once
        real = [v for i in range(p, q) for j in range(R) if 0 <= (v := i * s - pt + d * j) < H]
        u0, u1 = (min(real), max(real) + 1) if real else (a, a)   # none: all padding
        l_r, h_r = max(0, a - u0), max(0, u1 - b)
        if (r > 0 and l_r > in_counts[r - 1]) or (r + 1 < P and h_r > in_counts[r + 1]):
            raise ValueError(
                f"{what}: rank {r} computes output rows [{p}, {q}) and needs input rows "
                f"[{u0}, {u1}), beyond its neighbours' bands {ins[max(r - 1, 0)]}..{ins[min(r + 1, P - 1)]}; "
                f"use fewer ranks than {P} or a larger image than {H} rows")
        start = a - l_r                              # global row of the extended block's first row
        lo.append(l_r), hi.append(h_r), use.append((u0 - start, u1 - start))
        pad.append((u0 - n0, n1 - u1) if real else (n1 - n0, 0))
    return RowPlan(H, Ho, in_counts, tuple(out_counts), tuple(lo), tuple(hi), tuple(use), tuple(pad))


def split_rows(x, group, counts=None):
    """This rank's band of rows (axis 2) of a full (N, C, H, W) image, as a contiguous copy."""
    xp = get_array_module(x)
    a, b = row_bands(x.shape[2], group.size, counts)[group.rank]
    return xp.ascontiguousarray(x[:, :, a:b])


# --------------------------------------------------------------------------- #
# the layers
# --------------------------------------------------------------------------- #
class _SpatialWindow(ParallelModule):
    """A windowed op (conv, pool) on a band of rows: halo in, local op, halo gradient back."""

    _fixed_dtype = True          # a conv has a dtype; a pool follows its input

    def _setup_plan(self, group, in_height, kernel, stride, padding, dilation, in_counts, name):
        self.group, self.name = group, name
        self.kernel_size = F._pair(kernel)
        self.stride, self.dilation = F._pair(stride), F._pair(dilation)
        self.padding = F.normalize_padding(padding)
        (t, b), _ = self.padding
        self.plan = plan_rows(in_height, self.kernel_size[0], self.stride[0], t, b, self.dilation[0],
                              group.size, in_counts, what=name)
        r = group.rank
        self.in_counts, self.out_counts = self.plan.in_counts, self.plan.out_counts
        self.in_height, self.out_height = self.plan.in_height, self.plan.out_height
        self._lo, self._hi = self.plan.lo[r], self.plan.hi[r]
        self._use, self._pad = self.plan.use[r], self.plan.pad[r]

    def _out_w(self, W):
        _, (l, r) = self.padding
        return F.conv_output_size(W, self.kernel_size[1], self.stride[1], l, r, self.dilation[1])

    def _local_padding(self):
        return (self._pad, self.padding[1])

    def _gather_halo(self, x):
        """x : (N, C, n_r, W) -> the rows this rank's outputs read (halo included), and the
        extended block's row count (for backward)."""
        n_r = self.in_counts[self.group.rank]
        ok = x.ndim == 4 and x.shape[2] == n_r
        narrow = ok and self._out_w(x.shape[3]) <= 0
        self._check_input(x, ok and not narrow,
                          lambda: f"(N, C, {n_r}, W): its band of {n_r} of {self.in_height} rows"
                          + (", W at least the kernel's width" if narrow else ""),
                          dtype=self._fixed_dtype)
        ext = x
        if self.plan.any_halo:
            with self.phase("forward"):
                ext = halo_exchange(self.group, x, list(self.plan.lo), list(self.plan.hi), axis=2)
        u0, u1 = self._use
        used = ext if (u0, u1) == (0, ext.shape[2]) else ext[:, :, u0:u1]
        return used, ext.shape

    def _scatter_halo(self, dused, ext_shape):
        """Adjoint of :meth:`_gather_halo`: place the used rows' gradient, halo_add it home."""
        xp = get_array_module(dused)
        u0, u1 = self._use
        if (u0, u1) == (0, ext_shape[2]) and dused.shape == tuple(ext_shape):
            dext = dused
        else:
            dext = xp.zeros(ext_shape, dtype=dused.dtype)
            dext[:, :, u0:u1] = dused
        if not self.plan.any_halo:
            return dext
        with self.phase("backward"):
            return halo_add(self.group, dext, list(self.plan.lo), list(self.plan.hi), axis=2)

    def _halo_collectives(self, input_shape):
        """The four sendrecvs of the exchange and the add (counts: rows sent x N*C*W)."""
        if not self.plan.any_halo:
            return []
        N, C, _, W = input_shape
        row, r, P = N * C * W, self.group.rank, self.group.size
        lo, hi = self.plan.lo, self.plan.hi
        out = [self._c("forward", "sendrecv", self.group, row * (lo[r + 1] if r + 1 < P else 0)),
               self._c("forward", "sendrecv", self.group, row * (hi[r - 1] if r > 0 else 0))]
        if self.input_grad:
            out += [self._c("backward", "sendrecv", self.group, row * (lo[r] if r > 0 else 0)),
                    self._c("backward", "sendrecv", self.group, row * (hi[r] if r + 1 < P else 0))]
        return out

    def _out_shape(self, input_shape, channels):
        N, _, _, W = input_shape
        return (N, channels, self.out_counts[self.group.rank], self._out_w(W))


class SpatialParallelConv2d(_SpatialWindow):
    """2-D convolution of an image split by rows over the group; weights replicated.

    Contract row:

    =================================== ============================================ ==================================
    layer                               forward                                      backward
    =================================== ============================================ ==================================
    spatial-parallel conv/pool (split   halo exchange (sendrecv) with neighbours     adjoint: halo add back to owners;
    H)                                                                               allreduce of [dW, db] over the
                                                                                     group (unless reduce_grads=False)
    =================================== ============================================ ==================================

    See the module docstring for the partition rule and the row plan.

    Parameters
    ----------
    in_channels, out_channels : C, K
    kernel_size, stride, padding, dilation : as :class:`mpifc.nn.Conv2d`; the top/bottom
        padding applies at the image border only (first/last rank with output rows)
    group : Communicator that splits the image height (the spatial group)
    in_height : H, the global input height (bands are derived from it)
    bias : learn b : (K,), replicated
    in_counts : input rows per rank (default balanced counts of H)
    reduce_grads : allreduce the weight gradient over the group in backward (default);
        False leaves the per-band partial gradients for the caller to sum
    name, init, rng, seed, dtype, xp : as :class:`mpifc.nn.Conv2d`; only the group root
        draws from ``rng``, then broadcasts W
    groups : as :class:`mpifc.nn.Conv2d` (weights are replicated, so any G works)

    Shapes
    ------
    x : (N, C, in_counts[r], W) -> y : (N, K, out_counts[r], Wo)
    """

    def __init__(self, in_channels, out_channels, kernel_size, group, in_height, stride=1, padding=0,
                 dilation=1, bias=True, in_counts=None, reduce_grads=True, *, name="sconv",
                 init="kaiming_uniform", rng=None, seed=None, dtype=np.float32, xp=None, groups=1):
        super().__init__()
        self._setup_plan(group, in_height, kernel_size, stride, padding, dilation, in_counts, name)
        C, K, G = int(in_channels), int(out_channels), int(groups)
        if G < 1 or C % G or K % G:
            raise ValueError(f"{name}: groups={G} must divide in_channels={C} and out_channels={K}")
        self.in_channels, self.out_channels, self.groups = C, K, G
        self.reduce_grads = bool(reduce_grads)
        self.xp, self.dtype = resolve_xp(xp), resolve_dtype(dtype)
        shape = (K, C // G) + self.kernel_size
        # replicated weight: the root draws (as the serial layer would), the group gets a copy
        full = np.empty(shape, dtype=self.dtype)
        if group.rank == 0:
            full[...] = I.initialize(init, shape, I.make_rng(rng, seed), self.dtype)
        group.bcast(full, root=0)
        self.weight = Parameter(place(full, self.xp, self.dtype), "weight")
        self._params = [self.weight]
        self.bias = None
        if bias:
            self.bias = Parameter(place(np.zeros(K), self.xp, self.dtype), "bias")
            self._params.append(self.bias)
        self._cache = None

    def forward(self, x):
        """x : (N, C, n_r, W) band -> y : (N, K, out_counts[r], Wo) band."""
        if x.ndim == 4 and x.shape[1] != self.in_channels:
            self._refuse("input", x.shape, f"(N, {self.in_channels}, rows, W)")
        used, ext_shape = self._gather_halo(x)
        xp = get_array_module(x)
        rows = self.out_counts[self.group.rank]
        if rows == 0:          # an empty output band: nothing to compute, halos still flowed
            self._cache = (None, ext_shape)
            self._y_shape = self._out_shape(x.shape, self.out_channels)
            return xp.zeros(self._y_shape, dtype=x.dtype)
        y, cache = F.conv2d_forward(used, self.weight.data, None if self.bias is None else self.bias.data,
                                    self.stride, self._local_padding(), self.dilation, self.groups)
        self._cache = (cache, ext_shape)
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, K, out_counts[r], Wo) -> dx : (N, C, n_r, W); dW, db summed over the group."""
        self._check_grad(dy, self._y_shape if self._cache is not None else None)
        cache, ext_shape = self._cache
        self._cache = None
        xp = get_array_module(dy)
        if cache is None:      # an empty output band: zero gradients, still in the allreduce
            dused = None
            if self.input_grad:
                dused = xp.zeros(ext_shape[:2] + (0,) + ext_shape[3:], dtype=dy.dtype)
            dW = xp.zeros_like(self.weight.data)
            db = xp.zeros_like(self.bias.data) if self.bias is not None else None
        else:
            dused, dW, db = F.conv2d_backward(dy, cache, need_dx=self.input_grad,
                                              need_db=self.bias is not None)
        if self.reduce_grads and self.group.size > 1:
            # my band's partial gradient; one fused allreduce completes [dW, db]
            nW = dW.size
            buf = xp.empty(nW + (db.size if db is not None else 0), dtype=dW.dtype)
            buf[:nW] = dW.reshape(-1)
            if db is not None:
                buf[nW:] = db
            with self.phase("backward"):
                self.group.allreduce(buf, out=buf)
            dW = buf[:nW].reshape(dW.shape)
            db = buf[nW:] if db is not None else None
        self.weight.add_grad(dW)
        if self.bias is not None:
            self.bias.add_grad(db)
        if dused is None:
            return None
        return self._scatter_halo(dused, ext_shape)

    # --- description ---
    def output_shape(self, input_shape):
        return self._out_shape(input_shape, self.out_channels)

    def collectives(self, input_shape):
        out = self._halo_collectives(input_shape)
        if self.reduce_grads and self.group.size > 1:
            n = self.weight.size + (self.bias.size if self.bias is not None else 0)
            out.append(self._c("backward", "allreduce", self.group, n))
        return out

    def flops(self, input_shape):
        f, b = conv_flops(self.output_shape(input_shape), self.in_channels // self.groups,
                          *self.kernel_size)
        return f, (b if self.input_grad else b // 2)

    def __repr__(self):
        r = self.group.rank
        return (f"SpatialParallelConv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, rows {self.plan.in_rows(r)} of {self.in_height} -> "
                f"{self.plan.out_rows(r)} of {self.out_height}, reduce_grads={self.reduce_grads})")


class _SpatialPool(_SpatialWindow):
    """Pooling over a band of rows: the halo exchange of a conv, no parameters."""

    _fixed_dtype = False

    def __init__(self, kernel_size, group, in_height, stride=None, padding=0, in_counts=None, *,
                 name="spool", dtype=np.float32):
        super().__init__()
        k = F._pair(kernel_size)
        self._setup_plan(group, in_height, k, stride if stride is not None else k, padding, 1,
                         in_counts, name)
        self.dtype = resolve_dtype(dtype)      # for collectives(); forward follows the input
        self._cache = None

    def forward(self, x):
        """x : (N, C, n_r, W) band -> y : (N, C, out_counts[r], Wo) band."""
        self.dtype = np.dtype(x.dtype)
        used, ext_shape = self._gather_halo(x)
        if self.out_counts[self.group.rank] == 0:
            self._cache = (None, ext_shape)
            self._y_shape = self._out_shape(x.shape, x.shape[1])
            return get_array_module(x).zeros(self._y_shape, dtype=x.dtype)
        y, cache = self._pool_forward(used)
        self._cache = (cache, ext_shape)
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """dy : (N, C, out_counts[r], Wo) -> dx : (N, C, n_r, W)."""
        self._check_grad(dy, self._y_shape if self._cache is not None else None)
        cache, ext_shape = self._cache
        self._cache = None
        if not self.input_grad:
            return None
        if cache is None:
            dused = get_array_module(dy).zeros(ext_shape[:2] + (0,) + ext_shape[3:], dtype=dy.dtype)
        else:
            dused = self._pool_backward(dy, cache)
        return self._scatter_halo(dused, ext_shape)

    def output_shape(self, input_shape):
        return self._out_shape(input_shape, input_shape[1])

    def collectives(self, input_shape):
        return self._halo_collectives(input_shape)

    def flops(self, input_shape):
        out = self.output_shape(input_shape)
        R, S = self.kernel_size
        return int(np.prod(out)) * R * S, int(np.prod(input_shape))


class SpatialParallelMaxPool2d(_SpatialPool):
    """Max pooling of an image split by rows; padded positions (image border only) never win.

    Contract row: spatial-parallel conv/pool (split H) — forward halo exchange
    (sendrecv) with neighbours; backward the adjoint halo add back to the owners.
    Same partition rule and row plan as :class:`SpatialParallelConv2d`; ties pick the
    first maximum of the window, as the serial layer.

    Parameters
    ----------
    kernel_size, stride, padding : as :class:`mpifc.nn.MaxPool2d` (stride defaults to kernel)
    group, in_height, in_counts, name : as :class:`SpatialParallelConv2d`
    dtype : element type the message sizes of :meth:`collectives` assume (forward
        follows its input)

    Shapes
    ------
    x : (N, C, in_counts[r], W) -> y : (N, C, out_counts[r], Wo)
    """

    def _pool_forward(self, x):
        return F.maxpool2d_forward(x, self.kernel_size, self.stride, self._local_padding())

    def _pool_backward(self, dy, cache):
        return F.maxpool2d_backward(dy, cache)


class SpatialParallelAvgPool2d(_SpatialPool):
    """Average pooling of an image split by rows.

    Contract row: spatial-parallel conv/pool (split H) — forward halo exchange
    (sendrecv) with neighbours; backward the adjoint halo add back to the owners.
    With ``count_include_pad=False`` the divisor counts the real pixels of each
    window, exactly as the serial layer: padding exists only at the image border.

    Parameters
    ----------
    kernel_size, stride, padding, count_include_pad : as :class:`mpifc.nn.AvgPool2d`
    group, in_height, in_counts, name : as :class:`SpatialParallelConv2d`
    """

    def __init__(self, kernel_size, group, in_height, stride=None, padding=0, count_include_pad=True,
                 in_counts=None, *, name="spool", dtype=np.float32):
        super().__init__(kernel_size, group, in_height, stride, padding, in_counts, name=name,
                         dtype=dtype)
        self.count_include_pad = bool(count_include_pad)

    def _pool_forward(self, x):
        return F.avgpool2d_forward(x, self.kernel_size, self.stride, self._local_padding(),
                                   self.count_include_pad)

    def _pool_backward(self, dy, cache):
        return F.avgpool2d_backward(dy, cache)


class SpatialGather(ParallelModule):
    """End of a spatial section: allgather(v) the row bands into the whole image on every rank.

    Contract: forward one allgather(v) of this rank's band along H; backward none —
    the adjoint of the allgather keeps this rank's band of the gradient, which is the
    whole gradient because the layers after the gather run replicated (the same
    convention as ``gather_output`` of the column-parallel layers).

    Parameters
    ----------
    group : the spatial Communicator
    height : H, the global height of the image being gathered
    in_counts : rows per rank (default balanced: the output bands of a spatial layer)
    name : phase prefix; dtype : element type assumed by :meth:`collectives`

    Shapes
    ------
    x : (N, C, in_counts[r], W) -> y : (N, C, H, W), replicated
    """

    def __init__(self, group, height, in_counts=None, *, name="sgather", dtype=np.float32):
        super().__init__()
        self.group, self.name, self.height = group, name, int(height)
        if in_counts is None:
            in_counts = balanced_counts(self.height, group.size)[0]
        self.in_counts = tuple(int(c) for c in in_counts)
        if len(self.in_counts) != group.size or sum(self.in_counts) != self.height:
            raise ValueError(f"{name}: in_counts {self.in_counts} must have {group.size} entries "
                             f"summing to height {self.height}")
        self._band = row_bands(self.height, group.size, self.in_counts)[group.rank]
        self.dtype = resolve_dtype(dtype)

    def forward(self, x):
        r = self.group.rank
        self._check_input(x, x.ndim == 4 and x.shape[2] == self.in_counts[r],
                          lambda: f"(N, C, {self.in_counts[r]}, W): its band of "
                                  f"{self.in_counts[r]} of {self.height} rows", dtype=False)
        self.dtype = np.dtype(x.dtype)
        xp = get_array_module(x)
        # MPI gathers axis 0: rows to the front (one contiguous copy), gather, move back
        xt = xp.ascontiguousarray(xp.moveaxis(x, 2, 0))
        with self.phase("forward"):
            full = self.group.allgather(xt, counts=list(self.in_counts))
        y = xp.ascontiguousarray(xp.moveaxis(full, 0, 2))
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        self._check_grad(dy, getattr(self, "_y_shape", None))
        a, b = self._band
        return get_array_module(dy).ascontiguousarray(dy[:, :, a:b])

    def output_shape(self, input_shape):
        N, C, _, W = input_shape
        return (N, C, self.height, W)

    def collectives(self, input_shape):
        return [self._c("forward", "allgather", self.group, int(np.prod(input_shape)))]

    def flops(self, input_shape):
        return 0, 0
