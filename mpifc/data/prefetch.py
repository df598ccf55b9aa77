"""Loader prefetch on a device: the next batch's copy runs while the current step computes.

A :class:`~mpifc.data.DistributedLoader` whose batches go to a GPU (``xp`` is cupy,
image/feature data) hands out batch k only after it has *issued* batch k + 1:

1. read k + 1's rows on the host (HDF5 or the cache; in scatter mode the root reads
   and scatters, as without prefetch) and copy them into a pinned (page-locked) host
   buffer -- two sets of buffers, used in turn, sized once for the largest local
   batch, so nothing is allocated after the first two batches;
2. on the loader's own non-blocking copy stream, after the work already issued on the
   compute stream (an event wait: the copy's device memory may have been freed by that
   work), copy the rows to the device asynchronously, augment and normalise them
   there, and record an event;
3. when batch k + 1 is handed out (the start of the next step), the compute stream waits
   for that event -- on the device; the host does not wait.

So the host read and the copy of batch k + 1 overlap step k's kernels. Before a pinned
buffer is refilled, the host waits for the copy that last read it (two batches earlier:
long done). The batches are the same as without prefetch (same rows, same
augmentation, same position and resume semantics); on the host (``xp`` numpy) and
for text batches the loader reads each batch when it is asked for, as before.
"""
from __future__ import annotations

import numpy as np

from mpifc import backend


class Prefetcher:
    """The copy stream and the two sets of pinned buffers of one loader."""

    SLOTS = 2

    def __init__(self, loader):
        self.loader = loader
        self.stream = backend.new_stream()
        self._bufs = [dict() for _ in range(self.SLOTS)]      # per slot: name -> uint8 pinned
        self._events = [None] * self.SLOTS                   # per slot: its last copy
        self._next = 0
        self.allocations = 0           # pinned buffers allocated (stops after the first batches)

    def _pinned(self, slot: int, name: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` copied into slot's pinned buffer ``name`` (a view of its first bytes)."""
        buf = self._bufs[slot].get(name)
        if buf is None or buf.size < arr.nbytes:
            # room for the largest local batch of the plan (the first step is full)
            rows = max(max(self.loader.plan.counts(0)[0]), arr.shape[0], 1)
            row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
            buf = backend.pinned_empty(max(rows * row_bytes, arr.nbytes))
            self._bufs[slot][name] = buf
            self.allocations += 1
        view = buf[:arr.nbytes].view(arr.dtype).reshape(arr.shape)
        view[...] = arr
        return view

    def issue(self, epoch: int, step: int):
        """Start batch ``step`` of ``epoch``: (the Batch on the device, its ready event)."""
        ld = self.loader
        mine = ld._local_rows(epoch, step)
        x, y = ld._host_rows(epoch, step, mine)          # collective in scatter mode
        slot, self._next = self._next, (self._next + 1) % self.SLOTS
        if self._events[slot] is not None:
            self._events[slot].synchronize()      # the copy that last read these buffers
        hx, hy = self._pinned(slot, "x", x), self._pinned(slot, "y", y)
        xp = ld.xp
        dx, dy = xp.empty(x.shape, dtype=x.dtype), xp.empty(y.shape, dtype=y.dtype)
        backend.wait_event(backend.record_event(), self.stream)   # after the compute so far
        with backend.on_stream(self.stream):
            backend.copy_to_device_async(hx, dx, self.stream)
            backend.copy_to_device_async(hy, dy, self.stream)
            batch = ld._place(dx, dy, epoch, step, mine)      # augment, normalise: same stream
            ready = backend.record_event(self.stream)
        self._events[slot] = ready
        return batch, ready
