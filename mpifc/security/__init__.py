"""Security: model signing (Ed25519) and checks that keep files from elsewhere harmless.

    keys       generate / load Ed25519 key files, fingerprints (needs mpifc[security])
    signing    sign and verify a checkpoint's canonical content digest
    inputs     refuse HDF5 links and storage outside the file, declared-but-absent bytes
    commands   ``mpifc keys generate``, ``mpifc sign``, ``mpifc verify``

``cryptography`` is imported only when a key is used, so the default install stays small.
"""
