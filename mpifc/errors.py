"""Expected mistakes: errors whose message is the whole story.

A ``UserError`` is a mistake in what the user gave (config, layout, data, keys,
checkpoint), not a bug in mpifc: the entry point prints its message as one line,
with no traceback (``MPIFC_DEBUG=1`` shows it), and exits non-zero.

``all_ranks`` says that every rank of the job raises it in agreement (the same
check on the same agreed input, e.g. an impossible dp x tp layout): then only rank 0
prints it and every rank exits with status 1, without aborting the job. When one rank
raises it alone, that rank prints it and aborts the job (the others would wait in
their next collective forever). The entry point checks the claim: a rank whose peers
do not all fail within a short wait aborts the job instead of exiting alone.

    class GridError(UserError, ValueError, all_ranks=True): ...         # the family's default
    raise GridError("tp=2 does not divide the 3 ranks of the job")
    raise DatasetError(f"{path}: no such file", all_ranks=False)       # this rank's own view

ConfigError, GridError, TrainingError, CheckpointError and DatasetError claim
``all_ranks`` by default (mpifc raises them after agreeing on their input); pass
``all_ranks=False`` where one rank decides alone.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected mistake whose message is the whole story (no traceback)."""

    #: True when every rank raises it in agreement (only rank 0 prints it)
    all_ranks: bool = False

    def __init_subclass__(cls, all_ranks: bool | None = None, **kw):
        # class ConfigError(UserError, ValueError, all_ranks=True): the default of a family
        super().__init_subclass__(**kw)
        if all_ranks is not None:
            cls.all_ranks = bool(all_ranks)

    def __init__(self, *args, all_ranks: bool | None = None):
        super().__init__(*args)
        if all_ranks is not None:
            self.all_ranks = bool(all_ranks)
