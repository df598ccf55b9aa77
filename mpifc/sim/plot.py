"""Scaling curves of ``mpifc simulate`` as a PNG (the ``plot`` extra: matplotlib).

Left: step time split into compute and exposed communication, and the overlapped
(hidden) communication, against ranks. Right: samples per second against ranks,
with the ideal linear scaling from the first point. Both axes logarithmic.
"""
from __future__ import annotations


def _pos(x: float) -> float:
    """A value for a log axis: zero (or rounding residue) is left out (NaN)."""
    return x if x > 1e-9 else float("nan")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the message says how to get it)."""


def plot_scaling(rows: list[dict], path: str, title: str = "") -> None:
    """Write the PNG for rows of ``{"P": ranks, "report": StepReport}``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: "
                              "pip install 'mpifc[plot]' (the table above is complete)") from None
    if not rows:
        raise ValueError("nothing to plot: no feasible layout")
    rows = sorted(rows, key=lambda r: r["P"])
    P = [r["P"] for r in rows]
    rep = [r["report"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(P, [r.step_s for r in rep], "o-", label="step")
    a.plot(P, [r.compute_s for r in rep], "s--", label="compute")
    a.plot(P, [_pos(r.exposed_comm_s) for r in rep], "^--", label="exposed comm")
    a.plot(P, [_pos(r.overlapped_comm_s) for r in rep], "v:", label="overlapped comm")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("ranks")
    a.set_ylabel("seconds per step")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    sps = [r.samples_per_s for r in rep]
    b.plot(P, sps, "o-", label="predicted")
    b.plot(P, [sps[0] * p / P[0] for p in P], "k:", label="linear from first point")
    for p, r, s in zip(P, rep, sps):
        b.annotate(f"{r.dp}x{r.tp}", (p, s), fontsize=7, textcoords="offset points", xytext=(3, -9))
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("ranks")
    b.set_ylabel("samples / s")
    b.legend(fontsize=8)
    b.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
