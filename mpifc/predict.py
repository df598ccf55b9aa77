"""``mpifc predict``: logits and predicted classes of a checkpoint for every row of a dataset.

    mpiexec -n 3 mpifc predict runs/digits-mlp INPUT.h5 --out preds.h5 [--split test]

Under any dp x tp layout that fits the job (as ``mpifc eval``: the saved tp when it
divides the job size, else tp = 1; ``--set parallel.tp=...`` decides): the checkpoint
is loaded resharded, the split is read in input order (no shuffle) by the dp ranks,
each rank's logits (class-split under tp: allgather(v) over the tensor group) and the
sample indices they belong to are gathered(v) on rank 0, which writes, atomically
(a temporary file renamed into place)::

    /logits  (N, Q) the model's dtype, row i = sample i of the split
    /pred    (N,) int64 argmax of the logits
    /labels  (N,) int64 the split's labels (an mpifc dataset always has them)
    attrs    checkpoint (path), step, input, split, layout (JSON {"dp", "tp"})

The input is normalised with the INPUT file's own normalisation, as the loader does
for training and evaluation.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mpifc.comm import trace


def gathered_logits(model, loader, grid):
    """(indices, logits) of this dp rank's rows of the whole split, full classes.

    indices : (n,) int64 sample index in the split of each row
    logits : (n, Q) model dtype (class-split logits allgathered over the tensor group)
    """
    from mpifc.parallel.init import shard_counts

    model.eval()
    loader.set_position(0, 0)
    idx, out = [], []
    counts = shard_counts(model.num_classes, grid.tp_comm) if model.logits_sharded else None
    for batch in loader:
        logits = model.forward(batch.x)
        if counts is not None:            # (N, Q_r) -> (Q, N) rows = classes -> (N, Q)
            with trace.phase("predict.gather_classes"):
                logits = grid.tp_comm.allgather(np.ascontiguousarray(logits.T), counts=counts).T
        idx.append(loader.plan.local_indices(batch.epoch, batch.step, grid.dp_rank))
        out.append(np.ascontiguousarray(logits))
    q = model.num_classes
    return (np.concatenate(idx) if idx else np.zeros(0, np.int64),
            np.concatenate(out) if out else np.zeros((0, q), np.dtype(loader.dtype)))


def predict(checkpoint: str, input_path: str, out: str | None, *, split: str = "test",
            overrides=(), verify_key=None, comm=None) -> dict | None:
    """Run the model of ``checkpoint`` over ``split`` of ``input_path``; collective.

    Returns, on rank 0, {"logits", "pred", "labels", "step", "checkpoint", "layout"}
    (None elsewhere); writes ``out`` (if given) from rank 0. User mistakes raise
    SystemExit with the same line on every rank.
    """
    from mpifc.checkpoint import CheckpointError, load, stored_config
    from mpifc.comm import Grid, world
    from mpifc.config import ConfigError, loads_config
    from mpifc.data import DatasetError, DistributedLoader
    from mpifc.models import build_model

    from mpifc.cli import _eval_target

    comm = comm or world()
    got = None
    if comm.rank == 0:             # rank 0 reads and verifies for all: nobody splits off
        try:
            got = ("ok", *stored_config(_eval_target(checkpoint, False), verify_key=verify_key))
            if not os.path.exists(input_path):
                got = ("error", f"{input_path}: no such dataset file", None)
        except (CheckpointError, ValueError) as e:
            got = ("error", str(e), None)
    status, path, text = comm.bcast_obj(got)
    if status == "error":
        raise SystemExit(f"mpifc predict: {path}")
    if text is None:
        raise SystemExit(f"mpifc predict: {path} holds no config; it was not written by mpifc train")
    try:
        saved = loads_config(text)
        tp = saved["parallel"]["tp"] if comm.size % max(saved["parallel"]["tp"], 1) == 0 else 1
        cfg = loads_config(text, overrides=["parallel.dp=0", f"parallel.tp={tp}", *overrides])
    except ConfigError as e:
        raise SystemExit(f"mpifc predict: {e}")
    grid = Grid(comm, dp=cfg["parallel"]["dp"] or None, tp=cfg["parallel"]["tp"] or None)
    dtype = np.dtype(cfg["train"]["dtype"])
    try:
        loader = DistributedLoader(input_path, grid.dp_comm, split=split, shuffle=False,
                                   batch_size=cfg["train"]["eval_batch_size"], seed=cfg["seed"],
                                   mode=cfg["data"]["mode"], dtype=dtype)
    except DatasetError as e:
        raise SystemExit(f"mpifc predict: {e}")
    if tuple(loader.sample_shape) != tuple(cfg["model"]["input"]):
        raise SystemExit(f"mpifc predict: {input_path}: samples are {tuple(loader.sample_shape)} "
                         f"but the model's input is {tuple(cfg['model']['input'])}")
    model = build_model(cfg["model"], grid, seed=cfg["seed"], dtype=dtype)
    info = load(path, model, None, grid, rng=False, verify_key=verify_key)
    idx, logits = gathered_logits(model, loader, grid)
    result = None
    if grid.tp_rank == 0:          # one column of dp ranks holds every row; world rank 0 in it
        dc = grid.dp_comm
        counts = dc.allgather_obj(int(idx.shape[0]))
        with trace.phase("predict.gather_rows"):
            all_idx = dc.gather(idx, counts=counts)
            all_logits = dc.gather(logits, counts=counts)
        if dc.rank == 0:
            ordered = np.empty_like(all_logits)
            ordered[all_idx] = all_logits           # rows in input order
            labels = _labels(input_path, split)
            result = {"logits": ordered, "pred": ordered.argmax(axis=1).astype(np.int64),
                      "labels": labels, "step": int(info["step"]), "checkpoint": path,
                      "layout": {"dp": grid.dp, "tp": grid.tp}}
    err = None
    if result is not None and out:
        try:
            write_predictions(out, result, input_path, split)
        except OSError as e:
            err = f"cannot write {out}: {e}"
    err = comm.bcast_obj(err)
    if err:
        raise SystemExit(f"mpifc predict: {err}")
    return result


def _labels(path: str, split: str) -> np.ndarray:
    from mpifc.data.format import open_dataset

    f, _ = open_dataset(path)
    try:
        return np.asarray(f[split]["y"][...], dtype=np.int64)
    finally:
        f.close()


def write_predictions(out: str, result: dict, input_path: str, split: str) -> str:
    """Write ``result`` to ``out`` through a temporary file renamed into place."""
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("logits", data=result["logits"])
            f.create_dataset("pred", data=result["pred"])
            f.create_dataset("labels", data=result["labels"])
            f.attrs["checkpoint"] = os.path.abspath(result["checkpoint"])
            f.attrs["step"] = result["step"]
            f.attrs["input"] = os.path.abspath(input_path)
            f.attrs["split"] = split
            f.attrs["layout"] = json.dumps(result["layout"])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# ---------------------------------------------------------------------- the command
def _cmd_predict(args):
    res = predict(args.checkpoint, args.input, args.out, split=args.split, overrides=args.set,
                  verify_key=args.pubkey)
    if res is not None:
        acc = float((res["pred"] == res["labels"]).mean()) if len(res["labels"]) else float("nan")
        lay = res["layout"]
        print(f"{args.out}: {len(res['pred'])} rows of split {args.split!r} of {args.input} "
              f"(checkpoint {res['checkpoint']}, step {res['step']}, dp={lay['dp']} x "
              f"tp={lay['tp']}); accuracy against its labels {acc:.4f}", flush=True)


def add_predict(sub) -> None:
    """Register ``mpifc predict`` on the CLI's subparsers."""
    p = sub.add_parser("predict", help="logits and predicted class of a checkpoint for every "
                       "row of a dataset (any dp x tp layout)")
    p.add_argument("checkpoint", help="checkpoint file, or a checkpoint or run directory "
                   "(its latest)")
    p.add_argument("input", help="an mpifc HDF5 dataset (mpifc data prepare ...)")
    p.add_argument("--out", required=True, help="predictions file (.h5), written by rank 0")
    p.add_argument("--split", default="test", help="split of INPUT (default test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the stored config, e.g. parallel.tp=1")
    p.add_argument("--pubkey", metavar="PUB", help="refuse a checkpoint not signed by this "
                   "public key")
    p.set_defaults(func=_cmd_predict)
