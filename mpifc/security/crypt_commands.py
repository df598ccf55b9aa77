"""Command-line pieces of encryption at rest (registered by ``mpifc.cli``).

``add_data_key_command(keys_sub)`` adds ``generate-data-key`` to an existing
``mpifc keys`` subparsers object, which the signing commands create
(:func:`mpifc.security.commands.add_security`).
"""
from __future__ import annotations


def _cmd_generate_data_key(args):
    from mpifc.security.crypt import CryptError
    from mpifc.security.keys_data import generate_data_key

    try:
        kid = generate_data_key(args.path)
    except CryptError as e:
        raise SystemExit(f"mpifc keys generate-data-key: {e}")
    print(f"wrote data key {args.path} (mode 0600, key id {kid}); name it in the config as "
          "data.key_file / train.encrypt_key_file, or pass it to `mpifc data prepare "
          "--encrypt-key-file`. Keep a copy: data encrypted with it cannot be read without it.")


def add_data_key_command(keys_sub) -> None:
    """Register ``generate-data-key PATH`` under the ``keys`` subparsers ``keys_sub``."""
    g = keys_sub.add_parser("generate-data-key",
                            help="write a new random AES-256 data key (64 hex digits, mode 0600)")
    g.add_argument("path", help="key file to create (refused if it exists)")
    g.set_defaults(func=_cmd_generate_data_key)
