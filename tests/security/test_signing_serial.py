"""Signing a checkpoint, verifying it, and each way a tampered one is refused (one process)."""
import os

import h5py
import pytest

pytest.importorskip("cryptography")

from sign_helpers import REASONS, keypair, own_reason, tamper, trained  # noqa: E402

from mpifc.checkpoint import CheckpointError, describe, digest, save  # noqa: E402
from mpifc.checkpoint import atomic  # noqa: E402
from mpifc.comm import Grid, world  # noqa: E402
from mpifc.security import signing  # noqa: E402


@pytest.fixture
def signed(tmp_path):
    priv, pub, fp = keypair(tmp_path / "keys")
    priv2, pub2, fp2 = keypair(tmp_path / "other")
    m, opt = trained(3)
    path = save(tmp_path / "ckpt", m, opt, Grid(world()), step=4, sign_key=priv)
    return path, (priv, pub, fp), (priv2, pub2, fp2)


def test_sign_then_verify_passes_and_digest_ignores_signature(signed, tmp_path):
    path, (priv, pub, fp), _ = signed
    total, who = signing.verify_file(path, pub)
    assert who == fp
    with h5py.File(path) as f:
        assert f.attrs["signed_by"] == fp and f.attrs["signature_alg"] == "ed25519"
        assert digest.compute(f)[0] == total == f.attrs["digest"]
    m, opt = trained(3)                  # the same content unsigned has the same digest
    plain = save(tmp_path / "plain", m, opt, Grid(world()), step=4)
    with h5py.File(plain) as f:
        assert "signature" not in f.attrs
        assert digest.compute(f)[0] != ""


@pytest.mark.parametrize("case", list(REASONS))
def test_each_tampering_is_refused_with_its_own_reason(signed, case):
    path, (_, pub, _), (priv2, _, _) = signed
    tamper(case, path, priv2)
    with pytest.raises(CheckpointError) as e:
        signing.verify_file(path, pub)
    msg = str(e.value)
    assert own_reason(case, msg), msg
    assert "\n" not in msg


def test_checkpoint_is_signed_before_it_is_published(tmp_path, monkeypatch):
    """Under its final name a checkpoint is never unsigned: publish() sees a signed file."""
    priv, _, fp = keypair(tmp_path / "keys")
    seen = []
    real = atomic.publish

    def spy(tmp, final):
        with h5py.File(tmp) as f:
            seen.append(f.attrs.get("signed_by"))
        assert not os.path.exists(final)
        real(tmp, final)

    import sys
    save_mod = sys.modules["mpifc.checkpoint.save"]      # the package exports save() by name
    monkeypatch.setattr(save_mod, "publish", spy)
    m, opt = trained(3)
    for mode in ("gather", "per-rank"):
        save(tmp_path / mode, m, opt, Grid(world()), step=1, mode=mode, sign_key=priv)
    assert seen == [fp, fp]


def test_bad_sign_key_refuses_the_save_and_keeps_nothing(tmp_path):
    priv, _, _ = keypair(tmp_path / "keys")
    os.chmod(priv, 0o644)
    m, opt = trained(3)
    with pytest.raises(CheckpointError, match="readable by group/others"):
        save(tmp_path / "c", m, opt, Grid(world()), step=1, sign_key=priv)
    assert not os.path.exists(tmp_path / "c") or not os.listdir(tmp_path / "c")


def test_inspect_says_signed_or_not(signed, tmp_path):
    path, (_, pub, fp), (_, pub2, _) = signed
    assert f"signature: signed by {fp}, not verified" in describe(path)
    assert f"signature: OK, signed by {fp}" in describe(path, verify_key=pub)
    with pytest.raises(CheckpointError, match="signed by another key"):
        describe(path, verify_key=pub2)
    m, opt = trained(3)
    plain = save(tmp_path / "plain", m, opt, Grid(world()), step=4)
    assert "signature: not signed" in describe(plain)


def test_sign_file_signs_a_checkpoint_made_elsewhere_and_refuses_a_damaged_one(tmp_path):
    priv, pub, fp = keypair(tmp_path / "keys")
    m, opt = trained(3)
    plain = save(tmp_path / "plain", m, opt, Grid(world()), step=4)
    with pytest.raises(CheckpointError, match="not signed"):
        signing.verify_file(plain, pub)
    assert signing.sign_file(plain, priv) == (plain, fp)
    assert signing.verify_file(plain, pub)[1] == fp
    tamper("flipped bit", plain, None)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        signing.sign_file(plain, priv)
    assert [n for n in os.listdir(os.path.dirname(plain)) if ".tmp-" in n] == []
