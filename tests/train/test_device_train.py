"""train.device = "cuda" on a CPU machine, with the CuPy test double (tests/fakecupy.py).

The double's arrays refuse every implicit conversion to NumPy, so a step that runs
at all keeps model, gradients, optimizer state, batch and loss on the "device"; its
copy counters then check the copies against the design:

* the loader: one host-to-device copy per batch array (x, y) per step (prefetched: the
  first request issues the first two batches), and the normalisation's (mean, 1/std)
  once, with the first batch;
* staged communication (mpifc/comm/staging.py): every collective of the step on a
  device buffer -- the messages mpifc.sim.workload.describe_step predicts, less the
  trainer's host-side checks (check.finite, clip.norm) -- one device-to-host copy
  and one host-to-device copy; CUDA-aware ("device" path): none;
* no pinned staging buffer allocated after the first step.

Sharded == serial, here device == host: the same losses as the NumPy run.
digits-cnn (SyncBatchNorm over dp, class-parallel loss under tp), 3 steps, dp and tp
at 1 and 2 ranks (and whatever the job has).
"""
import os

import numpy as np
import pytest

import fakecupy as cp
from mpifc.comm import Communicator, trace
from mpifc.config import load_config

pytestmark = pytest.mark.mpi(min_size=1)

HOST_PHASES = ("check.finite", "clip.norm")      # the trainer's checks on host scalars
STEPS = 3


def _cfg(tmp, *extra):
    return load_config("digits-cnn", [f"data.dir={tmp}/data", "train.trace=false",
                                      "train.checkpoint_every=0", "train.share_gpu=true",
                                      *extra])


def _trainer(comm, cfg, out, aware=False):
    from mpifc.train import Trainer

    world = Communicator(comm.mpi, "world", cuda_aware=aware)   # staged or device path
    return Trainer(cfg, quiet=True, comm=world, out=out)


def _steps(tr, n=STEPS):
    """The trainer's step loop (batch, train_step, finite check); per step: loss, copies."""
    from mpifc.train import _agree_finite

    out, it = [], iter(tr.loader)
    for _ in range(n):
        c0 = cp.snapshot()
        batch = next(it)
        loss, _ = tr.train_step(batch)
        c1 = cp.snapshot()
        loss = float(loss)          # read back after the count: the trainer reads per window
        assert _agree_finite(tr.grid.world, loss)
        out.append((loss / int(batch.y.shape[0]), {k: c1[k] - c0[k] for k in c1}))
    return out


def _layouts(size):
    small = "parallel.bucket_mb=0.01"      # several gradient buckets (10 KiB each)
    got = [("dp", [small])]
    if size > 1:      # buckets allreduced after backward instead of overlapped; tensor parallel
        got += [("dp-blocking", [small, "parallel.overlap=false"]),
                ("tp", [f"parallel.tp={size}"])]
    return got


def _design_copies(cfg, tr):
    """(d2h, h2d) per step of the staged path, from the step's described messages."""
    from mpifc.sim.workload import describe_step

    want = describe_step(cfg, tr.grid.dp, tr.grid.tp, dp_rank=tr.grid.dp_rank,
                         tp_rank=tr.grid.tp_rank)
    dev_calls = [c for c in want.collectives if c.phase not in HOST_PHASES]
    batch_arrays = 2                                 # x and y
    return len(dev_calls), len(dev_calls) + batch_arrays


@pytest.mark.parametrize("aware", [False, True], ids=["staged", "cuda-aware"])
def test_digits_cnn_steps_on_the_double(comm, mpi_tmp_path, dev, aware):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    for name, lay in _layouts(comm.size):
        cfg = _cfg(tmp, *lay)
        host = _steps(_trainer(comm, cfg, f"{tmp}/{name}-cpu-{aware}"))
        assert all(c["h2d"] == c["d2h"] == 0 for _, c in host)    # numpy never touches it
        cfg = _cfg(tmp, *lay, "train.device=cuda")
        tr = _trainer(comm, cfg, f"{tmp}/{name}-cuda-{aware}", aware)
        assert tr.device.kind == "cuda" and cp.current_device == 0
        assert all(type(p.data) is cp.ndarray and type(p.grad) is cp.ndarray
                   for p in tr.model.parameters())
        pinned0 = cp.counts["pinned_allocs"]
        steps = _steps(tr)
        d2h, h2d = (0, 2) if aware else _design_copies(cfg, tr)
        if name.startswith("dp") and not aware:
            # the same count by hand: one staged allreduce per non-empty gradient bucket,
            # and SyncBatchNorm's two (statistics forward, gradient sums backward) per layer
            n_bn = sum(1 for t in cfg["model"]["layers"] if t["type"].startswith("batchnorm"))
            n_buckets = sum(1 for b in tr.dp.buckets if b.numel)
            assert d2h == ((n_buckets + 2 * n_bn) if comm.size > 1 else 0), (d2h, n_buckets)
            assert comm.size == 1 or n_buckets > 1
        norm = tr.loader.normalise and tr.loader.normalisation.kind != "none"
        for k, ((loss, c), (want_loss, _)) in enumerate(zip(steps, host)):
            assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), (name, k)
            once = 2 if (k == 0 and norm) else 0     # the normalisation's mean, 1/std: once
            # prefetch: the first step's batch request also issues the second batch's copies
            once += 2 if (k == 0 and tr.loader.prefetch) else 0
            assert (c["d2h"], c["h2d"]) == (d2h, h2d + once), (name, k, c)
            if k:
                assert c["pinned_allocs"] == 0, (name, k)   # staging buffers reused
            # no scalar read inside a step: loss and correct stay on the device, the
            # label/shape checks run on the host batch, SyncBatchNorm's count stays there
            assert c["scalar"] == 0, (name, k, c)
        if not aware and comm.size > 1:
            assert cp.counts["pinned_allocs"] > pinned0
        print(f"OK {name} {'cuda-aware' if aware else 'staged'}: per step d2h {d2h}, h2d {h2d}, "
              "scalar reads 0")
        # optimizer state lives on the device too
        state = [v for slot in tr.opt.state.values() for v in slot if v is not None]
        assert state and all(type(v) is cp.ndarray for v in state)


def test_a_whole_run_on_the_double_logs_evaluates_and_checkpoints(comm, mpi_tmp_path, dev):
    """Trainer.run(): steps, log lines, evaluation, a checkpoint, all without an implicit
    host conversion (the double would raise); the trace marks the staged calls."""
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    cfg = _cfg(tmp, "train.device=cuda", "train.max_steps=4", "train.log_every=2",
               "train.checkpoint_every=1", "train.trace=true")
    trace.reset()
    trace.enable()
    tr = _trainer(comm, cfg, f"{tmp}/run")
    last = tr.run()
    assert np.isfinite(last["loss"]) and tr.saved and os.path.exists(tr.saved)
    res = tr.evaluate()
    assert 0.0 <= res["test_acc"] <= 1.0
    paths = {e.get("path") for e in trace.events()}
    assert paths == ({None, "staged"} if comm.size > 1 else {None})
