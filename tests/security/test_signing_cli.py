"""`mpifc keys / sign / verify / eval --pubkey / train --resume` end to end under mpiexec.

The "Done when" of issue 17 item 1: at 1, 2 and 3 ranks a signed checkpoint verifies
and evaluates; each tampering is refused on every rank with its own one-line reason
and a non-zero exit, and the job ends (every launch runs under a timeout).
"""
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("cryptography")

from joblaunch import MPIEXEC, child_env, run_job  # noqa: E402
from sign_helpers import REASONS, own_reason, tamper  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def mpifc(*args, n=None, cwd=None, timeout=240):
    cmd = [sys.executable, "-m", "mpifc", *map(str, args)]
    if n:
        return run_job(cmd, n, timeout=timeout, cwd=cwd)[0]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=cwd)


def cli(*args):
    """(exit code, one-line message or "") of a one-process command, run in this process."""
    from mpifc.cli import build_parser

    a = build_parser().parse_args([str(x) for x in args])
    try:
        a.func(a)
    except SystemExit as e:
        return (1 if isinstance(e.code, str) else e.code or 0), str(e.code or "")
    return 0, ""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """digits-mlp, 1 epoch on 2 ranks, every checkpoint signed by train.sign_key."""
    tmp = tmp_path_factory.mktemp("signcli")
    from mpifc.security.keys import generate

    generate(tmp / "keys")
    fp = generate(tmp / "other")[2]
    p = mpifc("train", "digits-mlp", "--set", "train.epochs=1", "--set", "train.trace=false",
              "--set", f"train.sign_key={tmp}/keys/mpifc-sign.key", "--out", tmp / "run",
              "--quiet", n=2, cwd=tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    ckpt = sorted((tmp / "run" / "checkpoints").glob("ckpt-*.h5"))[-1]
    return tmp, ckpt, fp


def _copy(run, name):
    tmp, ckpt, _ = run
    dst = tmp / f"{name.replace(' ', '-')}.h5"
    shutil.copyfile(ckpt, dst)
    return dst


def test_keys_generate_command(tmp_path, capsys):
    assert cli("keys", "generate", tmp_path / "k") == (0, "")
    out = capsys.readouterr().out
    assert "mpifc-sign.key" in out and "fingerprint" in out
    rc, msg = cli("keys", "generate", tmp_path / "k")
    assert rc == 1 and "refusing to overwrite" in msg and "\n" not in msg


def test_verify_and_sign_commands(run, capsys):
    tmp, ckpt, other_fp = run
    assert cli("verify", ckpt, "--pubkey", tmp / "keys/mpifc-sign.pub") == (0, "")
    assert "OK, signed by" in capsys.readouterr().out
    rc, msg = cli("verify", ckpt, "--pubkey", tmp / "other/mpifc-sign.pub")
    assert rc == 1 and msg.startswith("mpifc verify: ") and "signed by another key" in msg
    assert "\n" not in msg
    c = _copy(run, "resigned")
    assert cli("sign", c, "--key", tmp / "other/mpifc-sign.key") == (0, "")
    assert other_fp in capsys.readouterr().out
    assert cli("verify", c, "--pubkey", tmp / "other/mpifc-sign.pub") == (0, "")
    capsys.readouterr()
    assert cli("inspect", c) == (0, "")
    assert f"signed by {other_fp}, not verified" in capsys.readouterr().out
    rc, msg = cli("inspect", c, "--pubkey", tmp / "keys/mpifc-sign.pub")
    assert rc == 1 and "signed by another key" in msg


def test_verify_command_exit_code_in_a_process(run):
    """The installed entry point: exit 0 when valid, 1 and one line on stderr otherwise."""
    tmp, ckpt, _ = run
    ok = mpifc("verify", ckpt, "--pubkey", tmp / "keys/mpifc-sign.pub")
    assert ok.returncode == 0, ok.stderr
    c = _copy(run, "proc-removed")
    tamper("removed signature", c, None)
    bad = mpifc("verify", c, "--pubkey", tmp / "keys/mpifc-sign.pub")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "not signed" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("n", [1, 2, 3])
def test_eval_of_signed_checkpoint_passes(run, n):
    tmp, ckpt, _ = run
    p = mpifc("eval", ckpt, "--pubkey", tmp / "keys/mpifc-sign.pub", n=n, cwd=tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test_acc" in p.stdout


CASES = [(3, c) for c in REASONS] + [(1, "another key"), (2, "removed signature")]


@pytest.mark.parametrize("n,case", CASES)
def test_eval_refuses_tampered_checkpoint_on_every_rank(run, n, case):
    tmp, ckpt, _ = run
    c = _copy(run, f"{case}-{n}")
    tamper(case, c, tmp / "other/mpifc-sign.key")
    p = mpifc("eval", c, "--pubkey", tmp / "keys/mpifc-sign.pub", n=n, cwd=tmp, timeout=120)
    assert p.returncode != 0, p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("mpifc eval:")]
    assert lines and all(own_reason(case, ln) for ln in lines), p.stderr
    assert "Traceback" not in p.stderr and "test_acc" not in p.stdout


def test_resume_refuses_unsigned_checkpoint_on_every_rank(run):
    tmp, ckpt, _ = run
    c = _copy(run, "unsigned-resume")
    tamper("removed signature", c, None)
    p = mpifc("train", "digits-mlp", "--set", "train.epochs=2", "--set", "train.trace=false",
              "--resume", c, "--pubkey", tmp / "keys/mpifc-sign.pub", "--out", tmp / "run2",
              "--quiet", n=2, cwd=tmp, timeout=120)
    assert p.returncode != 0
    assert "not signed" in p.stderr and "refusing to load" in p.stderr, p.stderr
