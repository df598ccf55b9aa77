"""HDF5 datasets: the file format, converters, and distributed loading.

    from mpifc.data import prepare_digits, read_info, DistributedLoader
    path = prepare_digits("runs/digits.h5")
    loader = DistributedLoader(path, grid.dp_comm, batch_size=64, seed=0)

The loader names are imported on first use: they need ``mpifc.comm`` (MPI), which
``mpifc data prepare`` does not.
"""
from mpifc.data.format import (FORMAT_VERSION, DatasetError, DatasetInfo, DatasetWriter,
                               Normalisation, SplitInfo, open_dataset, read_info, read_split,
                               write_dataset)
from mpifc.data.prepare import (CONVERTERS, prepare_cifar10, prepare_digits, prepare_mnist,
                                prepare_synthetic, read_cifar_batch, read_idx)
from mpifc.data.textformat import read_text_split, read_vocab, write_text_dataset
from mpifc.data.textprep import prepare_synthetic_text, prepare_text
from mpifc.data.named import prepared   # a named dataset (digits, ...) prepared by rank 0
from mpifc.data.augment import Augment                  # issue 18 item 3
from mpifc.data.validation import split_rows

_LOADER_NAMES = ("DistributedLoader", "BatchPlan", "Batch", "epoch_order")

__all__ = ["FORMAT_VERSION", "DatasetError", "DatasetInfo", "DatasetWriter", "Normalisation",
           "SplitInfo", "open_dataset", "read_info", "read_split", "write_dataset", "CONVERTERS",
           "prepare_cifar10", "prepare_digits", "prepare_mnist", "prepare_synthetic",
           "read_cifar_batch", "read_idx", "prepare_text", "prepare_synthetic_text",
           "read_text_split", "read_vocab", "write_text_dataset", "prepared", "Augment", "split_rows"]
# loader names: not star-imported (MPI)


def __getattr__(name):
    if name in _LOADER_NAMES:
        from mpifc.data import loader  # noqa: PLC0415 - imports mpi4py via mpifc.comm

        return getattr(loader, name)
    raise AttributeError(f"module 'mpifc.data' has no attribute {name!r}")
