"""mpifc plot RUN_DIR: a PNG of the curves in metrics.jsonl; one line without matplotlib."""
import json
import sys

import pytest

from mpifc.comm import world

pytestmark = pytest.mark.skipif(world().size != 1, reason="single-process tests")


def _run_dir(tmp_path):
    """metrics.jsonl as the trainer writes it: step records (log_every) and epoch records."""
    recs = []
    for s in range(1, 21):
        recs.append({"step": s, "epoch": (s - 1) // 10 + 1, "loss": 2.0 / s, "acc": 1 - 1 / (s + 1),
                     "lr": 0.1 * 0.5 ** ((s - 1) // 10)})
        if s % 10 == 0:
            recs.append({"epoch": s // 10, "step": s, "loss": 2.0 / s, "acc": 0.9, "lr": 0.1,
                         "samples_per_s": 5000.0 + s, "epoch_s": 1.0, "comm_s": 0.1,
                         "test_loss": 1.0 / s, "test_acc": 0.95})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(tmp_path)


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mpifc.cli import main

    run = _run_dir(tmp_path)
    assert main(["plot", run]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert main(["plot", run, "--out", str(tmp_path / "sub" / "c.png")]) == 0
    assert (tmp_path / "sub" / "c.png").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    from mpifc.cli import main

    run = _run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib fails
    with pytest.raises(SystemExit) as e:
        main(["plot", run])
    assert str(e.value.code) == ("mpifc plot: needs matplotlib, which is not "
                                 "installed: pip install 'mpifc[plot]'")
    assert not (tmp_path / "curves.png").exists()


def test_plot_of_a_directory_without_metrics(tmp_path):
    from mpifc.plot import PlotError, plot_run

    with pytest.raises(PlotError, match="metrics.jsonl: no such file"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(PlotError, match="line 1 is not JSON"):
        plot_run(str(tmp_path))


def test_plot_draws_validation_when_logged(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from mpifc.plot import plot_run

    run = _run_dir(tmp_path)
    labels, real = [], matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        labels.append((k.get("label"), list(a[1]) if len(a) > 1 else None))
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_run(run)
    assert "validation (epoch)" not in [l for l, _ in labels]        # none logged
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        if "test_loss" in r:
            r.update(val_loss=r["test_loss"] * 2, val_acc=0.5)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    labels.clear()
    plot_run(run)
    val = [ys for l, ys in labels if l == "validation (epoch)"]
    assert val == [[0.2, 0.1], [0.5, 0.5]]                           # loss, then accuracy
