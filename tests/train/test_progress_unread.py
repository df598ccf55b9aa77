"""Progress before any loss was read back (a device reads losses once per log line)."""
from mpifc.trainer import Progress


def test_progress_line_and_bar_without_a_loss_yet(capsys):
    p = Progress("lines", steps=10, epochs=1)
    p.start_epoch(0, 0)
    p.update(None, 64)
    assert "step 1/10  loss -" in capsys.readouterr().err
    bar = Progress("bar", steps=10, epochs=1)
    bar.start_epoch(0, 0)
    bar.update(None, 64)
    bar.update(0.5, 64)
    assert bar.bar.n == 2          # the bar advances with or without a loss
    bar.close()
