"""Named datasets (digits, synthetic, ...): prepared once, by rank 0, where a job finds them.

    path = prepared("digits", comm, dir="runs/data")     # collective; runs/data/digits.h5

``mpifc train`` does this for ``data.dataset = "<name>"`` (in ``data.dir``); a script
that builds its own model (:func:`mpifc.fit`) calls it directly. The file is written
to a temporary name and renamed into place; a failure on rank 0 is raised on every
rank.
"""
from __future__ import annotations

import os

from mpifc.data.format import DatasetError

#: names whose file depends on the per-sample shape (synthetic-<C>x<H>x<W>.h5)
SHAPED = ("synthetic", "synthetic-images")


def _builders(shape, seed):
    from mpifc.data import prepare, textprep

    return {
        "digits": lambda out: prepare.prepare_digits(out),
        "synthetic-images": lambda out: prepare.prepare_synthetic(
            out, n_train=4096, n_test=1024, shape=shape, num_classes=10, seed=seed),
        "synthetic": lambda out: prepare.prepare_synthetic(
            out, n_train=8192, n_test=1024, shape=shape, num_classes=10, seed=seed),
        # issue 13: the bundled text set, generated (a fixed seed: the same set for every run)
        "synthetic-text": lambda out: textprep.prepare_synthetic_text(
            out, n_train=8000, n_test=2000, num_classes=4, seed=0),
    }


NAMES = tuple(sorted(_builders(None, 0)))


def named_path(name: str, dir: str, shape=None) -> str:
    """Where a named dataset lives: ``dir/<name>[-<shape>].h5``."""
    tag = "-" + "x".join(map(str, shape)) if name in SHAPED else ""
    return os.path.join(dir, f"{name}{tag}.h5")


def prepared(name: str, comm, *, dir: str = "runs/data", shape=None, seed: int = 0) -> str:
    """Path of named dataset ``name`` in ``dir``, prepared by rank 0 of ``comm`` if missing.

    Collective over ``comm`` (every rank gets the path, or the same DatasetError).
    ``shape`` (per-sample, e.g. (3, 32, 32)) and ``seed`` are for the synthetic sets.
    """
    if name not in NAMES:
        raise DatasetError(f"no dataset named {name!r}; known: {list(NAMES)}")
    if name in SHAPED and shape is None:
        raise DatasetError(f"dataset {name!r} needs shape= (the per-sample shape)")
    path = named_path(name, dir, shape)
    err = None
    if comm.rank == 0 and not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            _builders(tuple(shape) if shape is not None else None, seed)[name](tmp)
            os.replace(tmp, path)        # never leave a half-written dataset behind
        except Exception as e:           # shared below so every rank raises, none waits
            err = f"{type(e).__name__}: {e}"
    err = comm.bcast_obj(err, root=0)
    if err:
        raise DatasetError(f"preparing dataset {name!r} failed on rank 0: {err}")
    return path
