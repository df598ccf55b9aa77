"""``mpifc keys generate DIR``, ``mpifc sign FILE --key PRIV``, ``mpifc verify FILE --pubkey PUB``.

Each works on this process alone (no collectives): under ``mpiexec`` every rank does
the same check and gets the same answer. Expected mistakes are one line and exit 1.
"""
from __future__ import annotations


def _fail(cmd: str, e: Exception):
    raise SystemExit(f"mpifc {cmd}: {e}")


def _cmd_keys_generate(args):
    from mpifc.security.keys import KeyFileError, generate

    try:
        priv, pub, fp = generate(args.dir)
    except (KeyFileError, OSError) as e:
        _fail("keys generate", e)
    print(f"private key {priv} (mode 0600: keep it secret, off shared file systems)")
    print(f"public key  {pub} (give this one to whoever verifies)")
    print(f"fingerprint {fp}")


def _cmd_sign(args):
    from mpifc.checkpoint import CheckpointError
    from mpifc.security.keys import KeyFileError
    from mpifc.security.signing import sign_file

    try:
        path, fp = sign_file(args.file, args.key)
    except (CheckpointError, KeyFileError, OSError) as e:
        _fail("sign", e)
    print(f"{path}: signed by {fp}")


def _cmd_verify(args):
    from mpifc.checkpoint import CheckpointError
    from mpifc.security.keys import KeyFileError
    from mpifc.security.signing import verify_file

    try:
        total, fp = verify_file(args.file, args.pubkey)
    except (CheckpointError, KeyFileError, OSError) as e:
        _fail("verify", e)
    print(f"{args.file}: OK, signed by {fp} ({total[:23]}...)")


def add_security(sub) -> None:
    """Register ``keys``, ``sign`` and ``verify`` on the top-level subparsers."""
    k = sub.add_parser("keys", help="keys: an Ed25519 signing pair, or a data key for "
                       "encryption at rest")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = ksub.add_parser("generate", help="write DIR/mpifc-sign.key (0600) and DIR/mpifc-sign.pub")
    g.add_argument("dir", help="directory for the key pair (created 0700 if missing)")
    g.set_defaults(func=_cmd_keys_generate)
    from mpifc.security.crypt_commands import add_data_key_command
    add_data_key_command(ksub)                          # keys generate-data-key (encryption)

    s = sub.add_parser("sign", help="sign a checkpoint with a private key (replaces its file "
                       "atomically)")
    s.add_argument("file", help="checkpoint file, or a directory (its latest)")
    s.add_argument("--key", required=True, help="private key file (mpifc-sign.key)")
    s.set_defaults(func=_cmd_sign)

    v = sub.add_parser("verify", help="check a checkpoint's digest and signature; exit 0 only "
                       "when it was signed by PUB and not changed since")
    v.add_argument("file", help="checkpoint file, or a directory (its latest)")
    v.add_argument("--pubkey", required=True, help="trusted public key file (mpifc-sign.pub)")
    v.set_defaults(func=_cmd_verify)
