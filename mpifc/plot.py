"""``mpifc plot RUN_DIR``: training curves from ``RUN_DIR/metrics.jsonl`` as one PNG.

Four panels against the optimizer step: loss (train per ``train.log_every`` step
when logged, train and test per epoch), accuracy (the same), learning rate, and
training samples/s per epoch. Needs the ``plot`` extra (matplotlib); without it,
one line says how to get it. Default output: ``RUN_DIR/curves.png``.
"""
from __future__ import annotations

import json
import os


class PlotError(RuntimeError):
    """No metrics to plot, or no matplotlib (the message is the one line to print)."""


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of ``run_dir``'s metrics.jsonl, in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise PlotError(f"{path}: no such file (is {run_dir} a run directory of mpifc train?)")
    steps, epochs = [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise PlotError(f"{path}: line {i} is not JSON") from None
            (epochs if "epoch_s" in rec else steps).append(rec)
    if not steps and not epochs:
        raise PlotError(f"{path}: no records yet")
    return steps, epochs


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write the curves of ``run_dir`` to ``out`` (default RUN_DIR/curves.png); returns it."""
    steps, epochs = read_metrics(run_dir)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("needs matplotlib, which is not installed: "
                        "pip install 'mpifc[plot]'") from None
    out = out or os.path.join(run_dir, "curves.png")

    def col(recs, key):
        got = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
        return [s for s, _ in got], [v for _, v in got]

    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for a, key, label in ((ax[0, 0], "loss", "loss"), (ax[0, 1], "acc", "accuracy")):
        if steps:
            a.plot(*col(steps, key), "-", lw=0.8, alpha=0.6, label="train (step)")
        a.plot(*col(epochs, key), "o-", label="train (epoch)")
        if any(f"val_{key}" in r for r in epochs):     # data.validation_split > 0
            a.plot(*col(epochs, f"val_{key}"), "^-", label="validation (epoch)")
        a.plot(*col(epochs, f"test_{key}"), "s-", label="test (epoch)")
        a.set_ylabel(label)
        a.legend(fontsize=8)
    if all(v > 0 for v in col(steps + epochs, "loss")[1]):
        ax[0, 0].set_yscale("log")
    ax[1, 0].plot(*col(steps or epochs, "lr"), ".-")
    ax[1, 0].set_ylabel("learning rate")
    ax[1, 1].plot(*col(epochs, "samples_per_s"), "o-")
    ax[1, 1].set_ylabel("training samples / s (per epoch)")
    ax[1, 1].set_ylim(bottom=0)
    for a in ax.flat:
        a.set_xlabel("optimizer step")
        a.grid(True, alpha=0.3)
    fig.suptitle(os.path.abspath(run_dir), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _cmd_plot(args):
    from mpifc.comm import world

    comm = world()
    err = path = None
    if comm.rank == 0:                 # a file command: rank 0 works, every rank exits alike
        try:
            path = plot_run(args.run_dir, args.out)
        except (PlotError, OSError) as e:
            err = str(e)
    err = comm.bcast_obj(err)
    if err:
        raise SystemExit(f"mpifc plot: {err}")
    if path:
        print(f"wrote {path}", flush=True)


def add_plot(sub) -> None:
    """Register ``mpifc plot`` on the CLI's subparsers."""
    p = sub.add_parser("plot", help="loss, accuracy, learning-rate and samples/s curves of a run "
                       "(PNG; needs the plot extra)")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)
