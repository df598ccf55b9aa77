"""Security: keys, signatures over the canonical checkpoint digest, chunked authenticated encryption.

Needs the optional extra ``pip install mpifc[security]`` (the ``cryptography`` package),
imported lazily where a key is actually used.
"""
