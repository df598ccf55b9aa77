"""Security: model signing (Ed25519), encryption at rest (AES-256-GCM), and checks that
keep files from elsewhere harmless.

    keys            generate / load Ed25519 key files, fingerprints
    signing         sign and verify a checkpoint's canonical content digest
    inputs          refuse HDF5 links and storage outside the file, declared-but-absent bytes
    crypt           chunked authenticated encryption of arrays in HDF5 files
    keys_data       data keys (32 bytes) from a file or an environment variable
    commands        ``mpifc keys generate``, ``mpifc sign``, ``mpifc verify``
    crypt_commands  ``mpifc keys generate-data-key``

``cryptography`` (``pip install mpifc[security]``) is imported only when a key is
used, so the default install stays small.
"""
