"""Checkpoints across devices: a run saved on the GPU continues on the CPU, and back.

The GPU is the CuPy test double (tests/fakecupy.py): parameters, buffers and the
optimizer's slots are device arrays, saved with explicit copies to the host and
loaded with explicit copies back. A checkpoint saved on one device and resumed on
either gives the same losses (float32, to 1e-5), also when the resumed job lays the
model out differently (dp -> tp on 2+ ranks).
"""
import numpy as np
import pytest

import fakecupy as cp
from mpifc.comm import Communicator
from mpifc.config import load_config

pytestmark = pytest.mark.mpi(min_size=1)
# the host runs the compiled kernels (mpifc.nn.hostjit) where the device double runs
# the NumPy ones: float32 rounding apart (1.4e-6 seen at 3 ranks)
TOL = 1e-5


def _trainer(comm, tmp, out, device, *extra):
    from mpifc.train import Trainer

    cfg = load_config("digits-cnn", [f"data.dir={tmp}/data", "train.trace=false",
                                     "train.checkpoint_every=0", "train.share_gpu=true",
                                     "optim.name=adam", f"train.device={device}", *extra])
    return Trainer(cfg, quiet=True, comm=Communicator(comm.mpi, "world"), out=f"{tmp}/{out}")


def _losses(tr, n):
    out = []
    for batch, _ in zip(tr.loader, range(n)):
        loss, _ = tr.train_step(batch)
        out.append(float(loss) / int(batch.y.shape[0]))     # a 0-d device array: read it
    return np.array(out)


@pytest.mark.parametrize("saved_on", ["cuda", "cpu"])
def test_resume_on_the_other_device_gives_the_same_losses(comm, mpi_tmp_path, dev, saved_on):
    tmp = str(comm.bcast_obj(str(mpi_tmp_path)))
    first = _trainer(comm, tmp, f"save-{saved_on}", saved_on)
    _losses(first, 3)
    first.step = 3
    path = first.save()
    layouts = [[]] + ([[f"parallel.tp={comm.size}"]] if comm.size > 1 else [])
    for lay in layouts:
        got = {}
        for device in ("cuda", "cpu"):
            tr = _trainer(comm, tmp, f"resume-{saved_on}-{device}-{len(lay)}", device, *lay)
            tr.resume(path)
            on_dev = type(tr.model.parameters()[0].data) is cp.ndarray
            assert on_dev == (device == "cuda")
            slots = [v for s in tr.opt.state.values() for v in s if v is not None]
            assert slots and all((type(v) is cp.ndarray) == on_dev for v in slots)
            got[device] = _losses(tr, 3)
        # every rank asserts on the same number: a rank that failed alone would leave
        # the others waiting in the next layout's collectives
        diff = comm.allreduce_obj(float(np.max(np.abs(got["cuda"] - got["cpu"]))), op="max")
        print(f"OK saved on {saved_on}, resumed {'as tp' if lay else 'same layout'}: "
              f"cuda vs cpu losses maxdiff = {diff:.2e}")
        assert diff <= TOL, (saved_on, lay, got)
