"""`mpifc text count` end to end under mpiexec (child jobs): output files, one-line errors.

Every job runs under a timeout: an error must end all ranks, never leave one waiting.
"""
import os
import shutil
import sys

import pytest

from joblaunch import MPIEXEC, run_job
from textcorpus import reference, write_case

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def count(*args, n=2, prefix=(), env=None):
    p, _ = run_job([*prefix, sys.executable, "-m", "mpifc", "text", "count", *args], n,
                   timeout=120, env=env)
    return p


def one_line_error(p, text):
    """Non-zero exit, ``text`` in exactly one stderr line, printed once, no traceback."""
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [l for l in p.stderr.splitlines() if "mpifc text count:" in l]
    assert len(lines) == 1 and text in lines[0], p.stderr
    assert "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_tsv_h5_and_trace(tmp_path, n):
    paths = write_case(str(tmp_path), "cjk") + write_case(str(tmp_path), "invalid")
    ref = reference(paths, "bigrams")
    want = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))
    p = count(*paths, "--cjk", "bigrams", "--top", "3", "--out", str(tmp_path / "o" / "c.tsv"), n=n)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [l.split("\t") for l in (tmp_path / "o" / "c.tsv").read_text("utf-8").splitlines()]
    assert [(t, int(c)) for t, c in rows] == want
    assert f"{sum(ref.values())} tokens, {len(ref)} distinct" in p.stdout
    assert f"top 3 of {len(ref)} distinct tokens:" in p.stdout
    assert "time in collectives" in p.stdout and "alltoallv" in p.stdout
    assert (tmp_path / "o" / "c.trace.chrome.json").exists()
    assert sorted(os.listdir(tmp_path / "o")) == sorted(
        ["c.tsv", "c.trace.chrome.json", "c.trace.summary.txt"]
        + [f"c.trace.rank{r}.jsonl" for r in range(n)])

    import h5py
    p = count(*paths, "--cjk", "bigrams", "--out", str(tmp_path / "c.h5"), "--top", "0", n=n)
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(tmp_path / "c.h5", "r") as f:
        got = list(zip(f["tokens"].asstr()[:], f["counts"][:].tolist()))
        assert got == want
        assert f.attrs["total_tokens"] == sum(ref.values()) and f.attrs["cjk"] == "bigrams"


def test_bytes_without_tokens_give_zero_counts(tmp_path):
    import h5py

    (tmp_path / "punct.txt").write_bytes(b".,;!\n--\n")
    p = count(str(tmp_path / "punct.txt"), "--out", str(tmp_path / "c.h5"), n=4)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 tokens, 0 distinct" in p.stdout
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["tokens"].shape == (0,) and f["counts"].shape == (0,)


def test_missing_file(tmp_path):
    paths = write_case(str(tmp_path), "tiny")
    one_line_error(count(*paths, str(tmp_path / "nope.txt"), n=3), f"{tmp_path}/nope.txt: no such file")


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "d").mkdir()
    one_line_error(count(str(tmp_path / "a.txt"), n=2), "the corpus is empty: 1 file(s), 0 bytes")
    one_line_error(count(str(tmp_path / "d"), n=2), "the corpus is empty: no files in")


def test_strict_names_file_and_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\n" * 4000 + b"caf\xe9\n")
    one_line_error(count(str(f), "--strict", "--block-mb", "0.001", n=3),
                   f"rank 2: {f}: invalid UTF-8 at byte 20003")
    assert count(str(f), n=3).returncode == 0                  # replaced by default


def test_bad_out_name(tmp_path):
    paths = write_case(str(tmp_path), "tiny")
    one_line_error(count(*paths, "--out", str(tmp_path / "c.csv"), n=2), "must end in .tsv")


def test_unreadable_file_or_directory(tmp_path):
    import tempfile

    prefix, env, d = (), None, str(tmp_path)
    if os.geteuid() == 0:             # root reads anything: run the job as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        d = tempfile.mkdtemp()        # outside pytest's root-only (0700) tmp tree
        os.chmod(d, 0o755)
        env = {"HOME": d}
        # Probe the very launch the test makes: a checkout or a venv under a 0700 directory
        # (mktemp -d) lets nobody start Python yet not import mpifc's comm layer or mpi4py.
        probe, _ = run_job([*prefix, sys.executable, "-c", "import mpifc.cli, mpifc.comm"], 1,
                           timeout=60, env=env)
        if probe.returncode != 0:
            shutil.rmtree(d, ignore_errors=True)
            pytest.skip("nobody cannot import mpifc and mpi4py from this checkout: "
                        + (probe.stderr.strip().splitlines() or ["?"])[-1])
    try:
        paths = write_case(d, "empty")
        os.chmod(paths[1], 0)
        one_line_error(count(*paths, n=2, prefix=prefix, env=env),
                       f"{paths[1]}: cannot read: Permission denied")
        os.chmod(paths[1], 0o644)
        sub = os.path.join(d, "sub")
        os.mkdir(sub)
        write_case(sub, "tiny")
        os.chmod(sub, 0)              # a directory that cannot be listed is not skipped
        one_line_error(count(d, n=2, prefix=prefix, env=env), f"{sub}: cannot read: Permission denied")
        os.chmod(sub, 0o755)
    finally:
        if d != str(tmp_path):
            shutil.rmtree(d)
