"""Metrics back to the host once per log line on a device (mpifc/stepmetrics.py), with the
CuPy test double (tests/fakecupy.py).

The design: a step reads nothing back (no scalar read); the per-step (loss sum,
correct) pairs stay on the device and come back in ONE device-to-host copy per window
-- each ``log_every`` step and the end of the epoch / run -- so a run of N steps from
step 0 (N within the first epoch, the run stopped by max_steps, no evaluation) makes
ceil(N / L) copies with ``log_every`` = L, and 1 with ``log_every`` = 0. With
CUDA-aware communication nothing else crosses to the host. A NaN injected at step k
inside a window still stops the run with the host's one-line error naming step k,
found by re-checking the window's per-step losses (first bad step over all ranks).
"""
import json
import math

import numpy as np
import pytest

import fakecupy as cp
from devicerun import digits_cnn_trainer as _trainer
from mpifc.comm import Communicator

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.mark.parametrize("n,every", [(5, 2), (4, 2), (3, 0), (3, 1)])
def test_metrics_come_back_once_per_log_line(comm, mpi_tmp_path, dev, n, every):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    host = _trainer(comm, tmp, f"cpu-{n}-{every}", f"train.max_steps={n}",
                    f"train.log_every={every}", device="cpu")
    want = host.run()
    tr = _trainer(comm, tmp, f"cuda-{n}-{every}", f"train.max_steps={n}",
                  f"train.log_every={every}")
    assert tr.loader.steps_per_epoch > n
    c0 = cp.snapshot()
    got = tr.run()
    c = {k: cp.counts[k] - c0[k] for k in c0}
    reads = math.ceil(n / every) if every else 1            # the design
    assert c["scalar"] == 0, c
    assert c["d2h"] == reads, (c, reads)
    assert c["d2h_bytes"] == n * 2 * 8                      # 16 bytes per step, once
    # the same metrics as the host run (device == host)
    for k in ("loss", "acc", "step"):
        assert abs(got[k] - want[k]) <= 1e-5 * max(1.0, abs(want[k])), (k, got[k], want[k])
    if comm.rank == 0 and every:
        recs = [json.loads(line) for line in open(f"{tmp}/cuda-{n}-{every}/metrics.jsonl")]
        host_recs = [json.loads(line) for line in open(f"{tmp}/cpu-{n}-{every}/metrics.jsonl")]
        lines = [r for r in recs if "samples_per_s" not in r]
        assert [r["step"] for r in lines] == list(range(every, n + 1, every))
        for a, b in zip(lines, [r for r in host_recs if "samples_per_s" not in r]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["acc"] == b["acc"], (a, b)


def _inject_nan(tr, at_step: int, rank: int):
    """The loss of step ``at_step`` (0-based) is NaN on ``rank`` of the world."""
    inner = tr.loss.forward

    def forward(logits, y):
        v = inner(logits, y)
        if tr.step == at_step and tr.comm.rank == rank:
            return v * float("nan")          # stays on the device
        return v
    tr.loss.forward = forward


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("k", [0, 2, 5])
def test_nan_at_step_k_names_step_k(comm, mpi_tmp_path, dev, k):
    """log_every = 4: the NaN at step k (0-based) is found at a window's end, and the error
    is the host's, word for word (the last rank's loss goes bad first)."""
    from mpifc.train import TrainingError

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    msgs = {}
    for device in ("cpu", "cuda"):
        tr = _trainer(comm, tmp, f"nan-{device}-{k}", "train.max_steps=7", "train.log_every=4",
                      device=device)
        _inject_nan(tr, k, comm.size - 1)
        with pytest.raises(TrainingError) as e:
            tr.run()
        msgs[device] = str(e.value)
    assert msgs["cuda"] == msgs["cpu"]
    assert msgs["cpu"].startswith(f"non-finite loss at step {k} (epoch 1, batch {k + 1}); "
                                  "the input was finite"), msgs
    assert "\n" not in msgs["cpu"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_input_at_step_k_blames_the_row_on_a_device(comm, mpi_tmp_path, dev):
    """A bad row at step 2 is named from the device run too: the window's bad step is
    re-read from the loader (deterministic) and its input checked."""
    from mpifc.data import DatasetError

    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    msgs = {}
    for device in ("cpu", "cuda"):
        tr = _trainer(comm, tmp, f"bad-row-{device}", "train.max_steps=6", "train.log_every=0",
                      device=device)
        tr.loader._read(np.array([0]))                       # fills the cache
        x = tr.loader._mem[0].astype(np.float32)
        row = int(tr.loader.plan.global_indices(0, 2)[-1])   # the last rank's last row
        x[row] = np.nan
        tr.loader._mem = (x, tr.loader._mem[1])
        with pytest.raises(DatasetError) as e:
            tr.run()
        msgs[device] = str(e.value)
    assert msgs["cuda"] == msgs["cpu"]
    assert msgs["cpu"].startswith("non-finite input at step 2 (epoch 1, batch 2)") and \
        f"row {row} of split 'train'" in msgs["cpu"], msgs


def test_losses_read_nothing_back_and_flag_bad_labels_with_nan(comm, dev):
    """On a device the losses check no label range on the host (a scalar read per step);
    an out-of-range class id makes the loss NaN instead of indexing past the logits."""
    from mpifc import nn
    from mpifc.parallel import ParallelSoftmaxCrossEntropy

    world = Communicator(comm.mpi, "world", cuda_aware=True)
    rng = np.random.default_rng(0)
    full = rng.standard_normal((4, 6)).astype(np.float32)
    for make, logits in ((lambda: nn.SoftmaxCrossEntropy(), full),
                         (lambda: ParallelSoftmaxCrossEntropy(6, world), None)):
        loss = make()
        if logits is None:         # this rank's classes of the class-split logits
            lo = sum(loss.counts[:world.rank])
            logits = full[:, lo:lo + loss.Q_r]
        x = cp.asarray(logits)
        c0 = cp.snapshot()
        good = loss.forward(x, cp.asarray(np.array([0, 5, 2, 1])))
        bad = loss.forward(x, cp.asarray(np.array([0, 6, 2, 1])))
        assert cp.counts["scalar"] == c0["scalar"]
        assert np.isfinite(float(good)) and np.isnan(float(bad))
