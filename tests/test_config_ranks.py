"""Config loading under mpiexec: every rank agrees on the file, one line for a mistake, no hang.

Each rank of an MPMD launch (``mpiexec -n 1 -wdir A ... : -n 2 -wdir B ...``) gets its own
working directory, so a relative config path names a file that some ranks see and others
do not -- as when the file sits in one node's working directory only.
"""
import os
import sys

import pytest

from joblaunch import MPIEXEC, child_env

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps=2", "--set", "train.trace=false",
        "--quiet"]


def _mpmd(tmp_path, rank0_dir, others_dir, *args, timeout=120):
    """3 ranks: rank 0 in ``rank0_dir``, ranks 1-2 in ``others_dir``; returns CompletedProcess."""
    import subprocess

    cmd = [sys.executable, "-m", "mpifc", "train", *args]
    full = [MPIEXEC, "-n", "1", "-wdir", str(rank0_dir), *cmd,
            ":", "-n", "2", "-wdir", str(others_dir), *cmd]
    return subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=tmp_path)


def _write_config(path, data_dir):
    path.write_text(f'[data]\ndataset = "digits"\ndir = "{data_dir}"\n'
                    '[model]\ninput = [1, 8, 8]\n'
                    'layers = [{type = "flatten"}, {type = "linear", out = 10}]\n')


def test_config_seen_by_rank0_only_is_shared_with_every_rank(tmp_path):
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    a.mkdir(), b.mkdir()
    _write_config(a / "run.toml", tmp_path / "data")
    p = _mpmd(tmp_path, a, b, "run.toml", *TINY, "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "done in" in p.stdout
    assert os.path.isdir(tmp_path / "out" / "checkpoints")


def test_config_missing_on_rank0_fails_every_rank_with_one_line(tmp_path):
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    a.mkdir(), b.mkdir()
    _write_config(b / "run.toml", tmp_path / "data")
    p = _mpmd(tmp_path, a, b, "run.toml", *TINY, timeout=60)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if "run.toml" in line]
    from mpifc.config import preset_names       # the shipped presets, whatever they are

    assert lines == ["mpifc train: 'run.toml' is neither a config file nor a preset; presets: "
                     + ", ".join(preset_names())], p.stderr
    assert "Traceback" not in p.stderr


def test_bad_value_under_mpiexec_is_one_line_from_rank0(tmp_path):
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpifc", "train", "digits-mlp",
           "--set", "optim.momentum=abc", *TINY]
    import subprocess

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(), cwd=tmp_path)
    assert p.returncode != 0
    assert p.stderr.strip() == ("mpifc train: --set optim.momentum=abc: optim.momentum must be a "
                                "number in [0, 1), got 'abc'"), p.stderr


def test_resume_directory_seen_by_rank0_only_gives_every_rank_the_same_error(tmp_path):
    """Rank 0 decides whether --resume names a directory; before, the ranks split (rank 0 in
    a bcast, the others in the load) and failed with a garbled 'refusing to load: u'."""
    import subprocess

    a, b = tmp_path / "node-a", tmp_path / "node-b"
    a.mkdir(), b.mkdir()
    base = [sys.executable, "-m", "mpifc", "train", "digits-mlp", *TINY,
            "--set", f"data.dir={tmp_path}/data"]
    p = subprocess.run([*base, "--out", str(a / "run")], capture_output=True, text=True,
                       timeout=120, env=child_env())
    assert p.returncode == 0, p.stderr
    p = _mpmd(tmp_path, a, b, "digits-mlp", *TINY[:-1], "--set", f"data.dir={tmp_path}/data",
              "--out", str(tmp_path / "out"), "--resume", "run/checkpoints", timeout=60)
    assert p.returncode != 0
    # one agreed line from rank 0 naming the ranks that could not open it
    failed = [line for line in p.stderr.splitlines() if line.startswith("mpifc:")]
    assert len(failed) == 1, p.stderr
    assert all("refusing to load run/checkpoints/ckpt-000002.h5: rank 1" in line or
               "refusing to load run/checkpoints/ckpt-000002.h5: ranks 1" in line
               for line in failed), p.stderr
