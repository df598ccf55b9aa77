"""A digits-cnn trainer on the device (the CuPy test double), shared by the device tests."""
from mpifc.comm import Communicator


def digits_cnn_trainer(comm, tmp, out, *extra, device="cuda"):
    """A config Trainer of digits-cnn in ``tmp/out``: no trace, no checkpoints (unless
    ``extra`` sets them), ranks sharing the "GPU", CUDA-aware (no staging copies)."""
    from mpifc.config import load_config
    from mpifc.train import Trainer

    cfg = load_config("digits-cnn", [f"data.dir={tmp}/data", "train.trace=false",
                                     "train.checkpoint_every=0", "train.share_gpu=true",
                                     f"train.device={device}", *extra])
    world = Communicator(comm.mpi, "world", cuda_aware=True)
    return Trainer(cfg, quiet=True, comm=world, out=f"{tmp}/{out}")
