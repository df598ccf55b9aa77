"""A process-wide choice read from an environment variable (``auto`` by default), which
code and tests may override: the host kernels (:mod:`mpifc.nn.hostjit`,
``MPIFC_KERNELS``) and the host GEMMs (:mod:`mpifc.nn.hostblas`, ``MPIFC_BLAS``).
Each module keeps its choice in ``state["mode"]`` (None: the environment's)."""
from __future__ import annotations

import contextlib
import os


def read(var: str, modes: tuple[str, ...], env=None) -> str:
    """The choice in ``var`` (default ``auto``); ValueError when it is not one of ``modes``."""
    env = os.environ if env is None else env
    m = env.get(var, "auto").strip().lower() or "auto"
    if m not in modes:
        raise ValueError(f"{var}={env[var]!r}: expected one of {', '.join(modes)}")
    return m


def check(m: str | None, modes: tuple[str, ...], what: str) -> None:
    """ValueError unless ``m`` is None or one of ``modes``."""
    if m is not None and m not in modes:
        raise ValueError(f"{what} mode {m!r}: expected one of {', '.join(modes)}")


@contextlib.contextmanager
def temporarily(state: dict, set_mode, m: str):
    """``set_mode(m)`` inside the block; ``state["mode"]`` as it was after it."""
    before = state["mode"]
    set_mode(m)
    try:
        yield
    finally:
        state["mode"] = before
