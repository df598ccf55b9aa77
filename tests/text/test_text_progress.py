"""Progress lines of `mpifc text count` (rank 0, stderr): a line every few seconds off a terminal."""
from mpifc.text.commands import Progress, format_summary
from mpifc.text.wordcount import CountResult


def test_progress_lines_when_not_a_terminal(capsys):
    prog = Progress(True, every_s=0.0)
    prog(5_000_000, 20_000_000)
    prog(20_000_000, 20_000_000)
    prog.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("text count: 5.0 of 20.0 MB read (25 %)")
    silent = Progress(False, every_s=0.0)
    silent(1, 2)
    assert capsys.readouterr().err == ""


def test_progress_waits_between_lines(capsys):
    prog = Progress(True, every_s=3600.0)
    prog(1, 10)                       # within the first interval: nothing yet
    assert capsys.readouterr().err == ""


def test_summary_names_every_collective():
    res = CountResult({}, [], files=2, bytes=3_000_000, tokens=500, distinct=40, seconds=1.5,
                      shuffles=2, collective_seconds={"allreduce": 0.01, "alltoallv": 0.25})
    text = format_summary(res, 4)
    assert text.splitlines() == [
        "2 file(s), 3.0 MB, 500 tokens, 40 distinct, 1.50 s, 2.0 MB/s on 4 rank(s), 2 shuffle(s)",
        "time in collectives (slowest rank): allreduce 0.010 s, alltoallv 0.250 s"]
