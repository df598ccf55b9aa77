"""``mpifc train``: a config in; a trained model, metrics, checkpoints and a trace out.

    mpiexec -n 2 mpifc train digits-cnn [--set parallel.tp=2] [--resume]

This module turns a config into objects -- the grid, the datasets' loaders, the model
(:func:`mpifc.models.build_model`), the optimizer, the schedule, the keys -- and hands
them to the object-level trainer of :mod:`mpifc.trainer`, the one :func:`mpifc.fit`
runs: the step, the epoch loop, metrics, checkpoints, resume and the trace live
there, once. :class:`Trainer` is that trainer built from a config; :func:`train` is
:func:`mpifc.trainer.run_job` on it.
"""
from __future__ import annotations

import os

import numpy as np

from mpifc.comm import Grid, world
from mpifc.config import to_toml
# the object-level trainer; these names are used from here too (tests, bench, cli)
from mpifc.trainer import (BEST_NAME, PROGRESS_MODES, Progress, Settings,  # noqa: F401
                           TrainingError, _agree_finite, generators, progress_mode, run_job,
                           setup_threads)
from mpifc.trainer import Trainer as ObjectTrainer


# ---------------------------------------------------------------------- set-up helpers
def _is_dataset_path(name: str) -> bool:
    return name.endswith((".h5", ".hdf5")) or os.path.sep in name


def absolute_data_paths(cfg: dict) -> dict:
    """``cfg`` with ``data.dir`` and a path ``data.dataset`` made absolute (against the cwd).

    Relative paths in a config mean "from where the job starts"; the trainer stores
    the absolute form in checkpoints, so ``mpifc eval DIR`` works from any directory.
    """
    d = cfg["data"]
    name = d["dataset"]
    fixed = {"dir": os.path.abspath(d["dir"]),
             "dataset": os.path.abspath(name) if _is_dataset_path(name) else name}
    if all(d[k] == v for k, v in fixed.items()):
        return cfg
    return {**cfg, "data": {**d, **fixed}}


def named_dataset_path(cfg: dict) -> str:
    """Where a named dataset (digits, synthetic, ...) lives: ``data.dir/<name>[-<shape>].h5``."""
    from mpifc.data.named import named_path

    return named_path(cfg["data"]["dataset"], cfg["data"]["dir"], cfg["model"]["input"])


def resolve_dataset(cfg: dict, comm) -> str:
    """Path of the HDF5 dataset; a named dataset is prepared once, by rank 0, if missing
    (:func:`mpifc.data.named.prepared`)."""
    from mpifc.config import ConfigError
    from mpifc.data import DatasetError
    from mpifc.data.named import NAMES, prepared

    name = cfg["data"]["dataset"]
    if _is_dataset_path(name):
        # rank 0 looks for every rank: a file only some ranks see must not split them
        if not comm.bcast_obj(os.path.exists(name) if comm.rank == 0 else None):
            raise DatasetError(f"dataset {name!r} not found; create it with "
                               "`mpifc data prepare ...`")
        return name
    if name not in NAMES:
        raise ConfigError(f"data.dataset {name!r}: expected a .h5 path or one of {sorted(NAMES)}")
    return prepared(name, comm, dir=cfg["data"]["dir"], shape=tuple(cfg["model"]["input"]),
                    seed=cfg["seed"])


def check_data_fits_model(loader, model_cfg: dict, path: str) -> None:
    """Raise TrainingError unless the samples are what ``model.input`` says (issue 13: a
    text dataset needs ``input = ["tokens"...]`` and an embeddingbag ``vocab`` that holds
    every id of the file, ``vocab >= vocab_size``)."""
    from mpifc.models import is_text_input

    want = model_cfg["input"]
    if loader.text or is_text_input(want):
        if not (loader.text and is_text_input(want)):
            raise TrainingError(f"{path}: a {'text' if loader.text else 'non-text'} dataset "
                                f"but model.input is {list(want)} (text: [\"tokens\"])")
        vocab = (model_cfg.get("layers") or [{}])[0].get("vocab", 0)
        if vocab < loader.vocab_size:
            raise TrainingError(f"{path}: the vocabulary has {loader.vocab_size} ids but the "
                                f"embeddingbag has vocab = {vocab}; set model.layers[0].vocab "
                                f">= {loader.vocab_size}")
    elif tuple(loader.sample_shape) != tuple(want):
        raise TrainingError(f"{path}: samples are {tuple(loader.sample_shape)} "
                            f"but model.input is {tuple(want)}")


def build_optimizer(cfg: dict, params):
    from mpifc import optim

    o = cfg["optim"]
    if o["name"] == "sgd":
        return optim.SGD(params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                         weight_decay=o["weight_decay"])
    cls = optim.Adam if o["name"] == "adam" else optim.AdamW
    return cls(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
               weight_decay=o["weight_decay"])


def build_schedule(cfg: dict, opt, steps_per_epoch: int, note=None):
    """The LR schedule and when it steps: ("step" | "epoch" | "metric", schedule) or None.

    ``schedule.min_lr`` is the floor of every schedule. The cosine spans
    ``train.epochs`` (``train.max_steps`` only cuts the run, so a cut run resumed
    continues the same curve); a warm-up not shorter than that span is shortened to a
    tenth of it, and ``note`` (a callable taking one line) is told.
    """
    from mpifc import optim

    s = cfg["schedule"]
    if s["name"] == "step":
        return "epoch", optim.StepLR(opt, step_size=s["step_size"], gamma=s["gamma"],
                                     min_lr=s["min_lr"])
    if s["name"] == "cosine":
        epochs = cfg["train"]["epochs"]
        total = epochs * steps_per_epoch
        warmup = s["warmup_steps"]
        if warmup >= total:
            warmup = total // 10
            if note is not None:
                note(f"schedule.warmup_steps = {s['warmup_steps']} is not shorter than the run "
                     f"({epochs} epoch(s) x {steps_per_epoch} steps = {total} steps): warm-up "
                     f"shortened to {warmup} steps, a tenth of the run")
        return "step", optim.CosineWarmup(opt, warmup_steps=warmup, total_steps=total,
                                          min_lr=s["min_lr"])
    if s["name"] == "plateau":
        return "metric", optim.ReduceLROnPlateau(opt, mode="min", factor=s["factor"],
                                                 patience=s["patience"], min_lr=s["min_lr"])
    return None


# ---------------------------------------------------------------------- the trainer
class Trainer(ObjectTrainer):
    """The object-level :class:`mpifc.trainer.Trainer` with data, model, optimizer and
    schedule built from a config on ``comm`` (the world).

    ``run()`` trains; ``save()``/``resume()`` write and read checkpoints;
    ``evaluate()`` returns test loss and accuracy. ``cfg`` is kept (``self.cfg``) and
    stored in every checkpoint as TOML.
    """

    def __init__(self, cfg: dict, *, quiet: bool = False, comm=None, out: str | None = None,
                 progress: str = "auto"):
        from mpifc.data.pipeline import training_loaders
        from mpifc.models import build_model

        self.cfg = cfg = absolute_data_paths(cfg)    # stored in checkpoints: any cwd reads it
        comm = comm or world()
        threads = setup_threads(comm)
        p, t = cfg["parallel"], cfg["train"]
        grid = Grid(comm, dp=p["dp"] or None, tp=p["tp"] or None)
        # train.device: model, optimizer state and batches live on self.device.xp (issue 15)
        from mpifc.device import select_device
        self.device = select_device(t.get("device", "cpu"), comm,
                                    share_gpu=t.get("share_gpu", False))
        xp = self.device.xp
        self.dtype = np.dtype(t["dtype"])

        from mpifc.security.crypt import config_keys      # encryption at rest (collective)
        self.data_key, ckpt_key = config_keys(cfg, comm)
        data_path = resolve_dataset(cfg, comm)
        dc = grid.dp_comm
        # train rows (less data.validation_split; augmented by data.augment), validation, test
        loader, val_loader, test_loader = training_loaders(cfg, data_path, dc, dtype=self.dtype,
                                                           key=self.data_key, xp=xp)
        check_data_fits_model(loader, cfg["model"], data_path)
        from mpifc.security.signing import check_keys   # security: bad key files fail now
        check_keys(cfg, comm)
        model = build_model(cfg["model"], grid, seed=cfg["seed"], dtype=self.dtype, xp=xp)
        if loader.num_classes > model.num_classes:
            raise TrainingError(f"the dataset has {loader.num_classes} classes but the "
                                f"model's last layer has {model.num_classes} outputs")
        super().__init__(model, loader, optimizer=build_optimizer(cfg, model.parameters()),
                         grid=grid, loss=model.loss, test_loader=test_loader,
                         val_loader=val_loader,
                         settings=Settings.from_config(cfg),
                         out=out or t["out"].format(name=cfg["name"]), title="mpifc train",
                         name=cfg["name"], quiet=quiet, progress=progress,
                         config=to_toml(cfg), ckpt_key=ckpt_key, bucket_mb=p["bucket_mb"],
                         overlap=p["overlap"], threads=threads, device=self.device)
        self.sched = build_schedule(cfg, self.opt, loader.steps_per_epoch, note=self._note)


def train(cfg: dict, *, quiet: bool = False, resume: str | bool | None = None,
          out: str | None = None, overwrite: bool = False, progress: str = "auto") -> dict:
    """Train ``cfg`` on the world communicator; returns the last epoch's metrics on rank 0.

    :func:`mpifc.trainer.run_job` on a :class:`Trainer` of ``cfg``: the run directory
    (``out``, default ``train.out``) holds one run: it is locked for the job
    (:mod:`mpifc.rundir`); a new run into a directory holding another run's outputs is
    refused unless ``resume`` (continue it) or ``overwrite`` (delete its outputs
    first). Resuming a run that is already past ``train.epochs`` / ``train.max_steps``
    says so and returns ``{"nothing_to_do": reason}`` without touching the outputs.
    """
    comm = world()
    out = out or cfg["train"]["out"].format(name=cfg["name"])
    return run_job(lambda: Trainer(cfg, quiet=quiet, comm=comm, out=out, progress=progress),
                   comm, out, resume=resume, overwrite=overwrite, title="mpifc train")
