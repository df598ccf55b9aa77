"""Key files: generated pair, modes, fingerprints, refusals (one line each)."""
import os
import stat
import sys

import pytest

pytest.importorskip("cryptography")

from mpifc.security import keys  # noqa: E402
from mpifc.security.keys import KeyFileError  # noqa: E402


def test_generate_writes_private_0600_and_public(tmp_path):
    priv, pub, fp = keys.generate(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(priv, "rb").read().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert open(pub, "rb").read().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(fp) == 16 and int(fp, 16) >= 0
    sk, pk = keys.load_private(priv), keys.load_public(pub)
    assert keys.fingerprint(sk.public_key()) == keys.fingerprint(pk) == fp
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        keys.generate(tmp_path / "k")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_private_key_readable_by_others_is_refused(tmp_path, mode):
    priv, _, _ = keys.generate(tmp_path)
    os.chmod(priv, mode)
    with pytest.raises(KeyFileError) as e:
        keys.load_private(priv)
    msg = str(e.value)
    assert "readable by group/others" in msg and "chmod 600" in msg and "\n" not in msg


def test_raw_keys_and_wrong_files(tmp_path):
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519

    sk = ed25519.Ed25519PrivateKey.generate()
    raw = tmp_path / "raw.key"
    raw.write_bytes(sk.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption()))
    os.chmod(raw, 0o600)
    rawpub = tmp_path / "raw.pub"
    rawpub.write_bytes(keys.raw_public(sk.public_key()))
    assert keys.fingerprint(keys.load_private(raw).public_key()) == \
        keys.fingerprint(keys.load_public(rawpub))
    priv, _, _ = keys.generate(tmp_path / "k")
    with pytest.raises(KeyFileError, match="holds a PRIVATE key"):
        keys.load_public(priv)
    junk = tmp_path / "junk"
    junk.write_text("hello")
    os.chmod(junk, 0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        keys.load_private(junk)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        keys.load_public(junk)
    with pytest.raises(KeyFileError, match="cannot be read"):
        keys.load_public(tmp_path / "missing.pub")


def test_missing_cryptography_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(KeyFileError) as e:
        keys.crypto()
    assert "pip install mpifc[security]" in str(e.value) and "\n" not in str(e.value)
