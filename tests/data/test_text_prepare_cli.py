"""`mpifc data prepare text` under mpiexec (child jobs): the distributed vocabulary equals
the one-rank file; bad input is one line from rank 0, a non-zero exit, never a hang."""
import os
import sys

import h5py
import numpy as np
import pytest

from joblaunch import MPIEXEC, run_job

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def prepare(*args, n=2):
    p, _ = run_job([sys.executable, "-m", "mpifc", "data", "prepare", *args], n, timeout=120)
    return p


def corpus(tmp_path):
    """An AG-News-like CSV pair, big enough that every rank counts a share."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)] + ["ünïcode", "日本語"]
    d = tmp_path / "ag"
    d.mkdir()
    for split, n in (("train", 400), ("test", 60)):
        lines = []
        for i in range(n):
            text = " ".join(rng.choice(words, rng.integers(1, 30)))
            lines.append(f'"{1 + i % 4}","title {i}","{text}"')
        (d / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def contents(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("vocab", "vocab_counts", "train/tokens", "train/offsets",
                                       "train/y", "test/tokens", "test/y")}


def test_three_ranks_write_the_file_one_rank_writes(tmp_path):
    src = corpus(tmp_path)
    outs = {}
    for n in (1, 3):
        outs[n] = str(tmp_path / f"o{n}.h5")
        p = prepare("text", str(src), "--text-column", "1,2", "--min-freq", "2",
                    "--max-vocab", "200", "--out", outs[n], n=n)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.count("wrote ") == 1 and "vocabulary 200 tokens" in p.stdout
    a, b = contents(outs[1]), contents(outs[3])
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def one_line_error(p, text):
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [l for l in p.stderr.splitlines() if "mpifc data prepare text:" in l]
    assert len(lines) == 1 and text in lines[0], p.stderr
    assert "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("case", ["missing", "column", "unknown_label", "empty"])
def test_bad_input_one_line_every_rank_exits(tmp_path, case):
    args = []
    if case == "missing":
        src, want = tmp_path / "absent", "no such file or directory"
    elif case == "column":
        src = tmp_path / "h.csv"
        src.write_text("label,body\n" + "".join(f"{i % 2},text {i}\n" for i in range(10)))
        args, want = ["--label-column", "label", "--text-column", "text"], "no column 'text'"
    elif case == "unknown_label":
        src = corpus(tmp_path)
        with open(src / "test.csv", "a") as f:
            f.write('"9","t","never seen in train"\n')
        args, want = ["--text-column", "2"], "label '9' of the test split is not a class"
    else:
        src = tmp_path / "e.csv"
        src.write_text("".join(f"{i % 2},!!\n" for i in range(10)))
        want = "the corpus is empty"
    p = prepare("text", str(src), *args, "--out", str(tmp_path / "o.h5"), n=2)
    one_line_error(p, want)
    assert not list(tmp_path.glob("o.h5*"))       # no file, no temporary corpus left


def test_synthetic_text_command(tmp_path):
    p = prepare("synthetic-text", "--n-train", "300", "--n-test", "100", "--out",
                str(tmp_path / "s.h5"), n=1)
    assert p.returncode == 0, p.stderr
    assert "train: 300 documents" in p.stdout and "classes (4)" in p.stdout
