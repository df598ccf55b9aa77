"""The loaders of a training run, from its config: train, validation (optional), test.

    loaders = training_loaders(cfg, path, grid.dp_comm, dtype=np.float32)
    loaders.train        rows of the train split left by data.validation_split, augmented
                         by data.augment (when set)
    loaders.validation   the held-out train rows (mpifc.data.validation), never augmented;
                         None when data.validation_split = 0
    loaders.test         the test split, never augmented

Evaluation loaders keep the file order (no shuffle) and use ``train.eval_batch_size``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpifc.data.augment import Augment
from mpifc.data.loader import DistributedLoader
from mpifc.data.validation import split_rows


class Loaders(NamedTuple):
    train: DistributedLoader
    validation: DistributedLoader | None
    test: DistributedLoader


def augment_from_config(cfg: dict) -> Augment | None:
    """``data.augment`` / ``data.crop_pad`` with the run's seed; None when nothing is on."""
    d = cfg["data"]
    aug = Augment(tuple(d["augment"]), pad=int(d["crop_pad"]), seed=int(cfg["seed"]))
    return aug if aug.active else None


def training_loaders(cfg: dict, path: str, comm, *, dtype=np.float32, key=None,
                     cache: bool = True, xp=None) -> Loaders:
    """The three loaders on the data-parallel communicator ``comm`` (collective); their
    batches are placed on ``xp`` (numpy, or cupy with ``train.device = "cuda"``)."""
    d, t = cfg["data"], cfg["train"]
    frac = float(d.get("validation_split", 0.0))
    common = dict(seed=cfg["seed"], mode=d["mode"], dtype=dtype, cache=cache, key=key, xp=xp)
    train = DistributedLoader(path, comm, split="train", batch_size=t["batch_size"],
                              rows=(lambda n: split_rows(n, frac)[0]) if frac else None,
                              augment=augment_from_config(cfg), **common)
    val = None
    try:
        if frac:
            val = DistributedLoader(path, comm, split="train", shuffle=False,
                                    batch_size=t["eval_batch_size"],
                                    rows=lambda n: split_rows(n, frac)[1], **common)
        test = DistributedLoader(path, comm, split="test", shuffle=False,
                                 batch_size=t["eval_batch_size"], **common)
    except BaseException:
        train.close()
        if val is not None:
            val.close()
        raise
    return Loaders(train, val, test)
