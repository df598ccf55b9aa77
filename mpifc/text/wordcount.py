"""Distributed word count: split, tokenize, count locally, shuffle to hash owners, gather tops.

The MapReduce shape, with every message an explicit traced collective:

1. **survey** (rank 0 stats and opens every file; ``bcast_obj`` of the list or the error)
2. **map**: each rank reads its line-aligned byte ranges (:mod:`mpifc.text.split`) block by
   block and counts tokens into a local table. After every block the ranks take one
   ``allreduce`` of four integers -- more input left?, a local table over the spill limit?,
   an error?, bytes read -- so all of them agree on when to shuffle, when to stop and
   whether to fail (an error on one rank fails every rank at the same point, never a hang),
   and rank 0 can report the job's progress.
3. **shuffle** (when a table is over the limit, and once at the end): token t belongs to
   rank ``crc32(utf8(t)) % P`` (a stable hash, the same in every process). Each rank packs
   its pairs per owner as a flat UTF-8 byte buffer, token byte lengths and counts; an
   ``alltoall`` of the per-owner sizes, then an ``alltoallv`` of the bytes and one of the
   (length, count) rows, and each owner adds what it receives into its own table. The local
   table is then emptied, so a rank holds at most the spill limit of not-yet-shuffled tokens
   plus its owner's share of the distinct tokens.
4. **reduce**: ``allreduce`` of (tokens, distinct tokens); each owner's top K by (count desc,
   token), then ``allgather`` of their sizes and ``gather`` (v) of bytes and rows to rank 0,
   whose top K of the union is the exact global top K (every token has one owner).

The full table (``--out``) is gathered to rank 0 the same way and written there, atomically.
"""
from __future__ import annotations

import heapq
import os
import stat
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mpifc.comm import trace
from mpifc.data.format import DatasetError
from mpifc.text.split import line_edge, nominal_pieces, read_blocks
from mpifc.text.tokenize import CJK_MODES, tokenize

#: read this many bytes per block (then one agreement allreduce)
BLOCK_BYTES = 8 << 20
#: shuffle early when a rank's local table holds more distinct tokens than this
SPILL_TOKENS = 1_000_000
#: collectives reported in the summary, in this order
REPORTED_OPS = ("allreduce", "alltoall", "alltoallv", "allgather", "gather", "bcast_obj",
                "allgather_obj")


class TextError(DatasetError):
    """Bad text input (missing / unreadable file, empty corpus, invalid UTF-8 under strict).

    Raised on every rank at the same point (``all_ranks``), so one rank prints it."""
    all_ranks = True


@dataclass
class CountResult:
    """What :func:`count_corpus` returns on every rank.

    ``counts`` is this rank's owned share of the table; ``top`` is the global top K,
    (token, count) sorted by count desc then token, on rank 0 (None elsewhere)."""
    counts: dict
    top: list | None
    files: int
    bytes: int
    tokens: int
    distinct: int
    seconds: float
    shuffles: int
    collective_seconds: dict = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def owner(token: str, nranks: int) -> int:
    """The rank that sums ``token``: a stable hash (CRC-32 of its UTF-8 bytes), not hash()."""
    return zlib.crc32(token.encode("utf-8")) % nranks


# ----------------------------------------------------------------------- survey
def _walk_error(e: OSError):
    raise TextError(f"{e.filename}: cannot read: {e.strerror}")


def _expand(paths) -> list[str]:
    """Files named, directories replaced by the files under them (sorted); a directory
    that cannot be listed is an error, not a silent gap in the corpus."""
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p, onerror=_walk_error):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names))
        else:
            files.append(p)
    return files


def _survey_local(paths) -> tuple[list[str], list[int]]:
    files, sizes = [], []
    for f in _expand(paths):
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise TextError(f"{f}: no such file") from None
        except OSError as e:
            raise TextError(f"{f}: cannot read: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise TextError(f"{f}: not a regular file")
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise TextError(f"{f}: cannot read: {e.strerror}") from None
        files.append(f)
        sizes.append(st.st_size)
    if not files:
        raise TextError(f"the corpus is empty: no files in {', '.join(map(str, paths))}")
    if sum(sizes) == 0:
        raise TextError(f"the corpus is empty: {len(files)} file(s), 0 bytes")
    return files, sizes


def survey(comm, paths) -> tuple[list[str], list[int]]:
    """(files, sizes), decided on rank 0 and broadcast; a bad path raises on every rank."""
    got = None
    if comm.rank == 0:
        try:
            got = ("ok", *_survey_local(paths))
        except TextError as e:
            got = ("error", str(e), None)
    status, files, sizes = comm.bcast_obj(got)
    if status == "error":
        raise TextError(files)
    return files, sizes


# ----------------------------------------------------------------------- map
class _Reader:
    """This rank's blocks of text: (path, offset, str), line-aligned pieces of the files."""

    def __init__(self, files, sizes, comm, block: int, strict: bool):
        self.files, self.sizes, self.block, self.strict = files, sizes, block, strict
        self.pieces = nominal_pieces(sizes, comm.size, comm.rank)
        self.bytes = 0

    def blocks(self):
        for index, lo, hi in self.pieces:
            path, size = self.files[index], self.sizes[index]
            try:
                with open(path, "rb") as f:
                    start, stop = line_edge(f, lo, size), line_edge(f, hi, size)
                    for off, data in read_blocks(f, start, stop, self.block):
                        self.bytes += len(data)
                        yield self._decode(path, off, data)
            except OSError as e:
                raise TextError(f"{path}: cannot read: {e.strerror or e}") from None

    def _decode(self, path, off, data: bytes) -> str:
        if not self.strict:
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"{path}: invalid UTF-8 at byte {off + e.start} "
                            "(--strict; without it such bytes read as U+FFFD)") from None


# ----------------------------------------------------------------------- shuffle
def _pack(items) -> tuple[np.ndarray, np.ndarray]:
    """(flat UTF-8 bytes, (n, 2) int64 rows of (byte length, count)) of (token, count) pairs."""
    enc = [t.encode("utf-8") for t, _ in items]
    rows = np.empty((len(enc), 2), dtype=np.int64)
    if enc:
        rows[:, 0] = [len(b) for b in enc]
        rows[:, 1] = [c for _, c in items]
    return np.frombuffer(b"".join(enc), dtype=np.uint8), rows


def _unpack(buf: np.ndarray, rows: np.ndarray):
    """The (token, count) pairs of :func:`_pack`'s output."""
    raw = buf.tobytes()
    ends = np.cumsum(rows[:, 0]).tolist()
    starts = [0] + ends[:-1]
    return zip((raw[a:b].decode("utf-8") for a, b in zip(starts, ends)), rows[:, 1].tolist())


def shuffle(comm, local: Counter, owned: dict) -> None:
    """Send every (token, count) of ``local`` to its owner and add what arrives to ``owned``."""
    P = comm.size
    per = [[] for _ in range(P)]
    for tok, c in local.items():
        per[zlib.crc32(tok.encode("utf-8")) % P].append((tok, c))
    packed = [_pack(items) for items in per]
    sizes = np.array([[len(rows), len(buf)] for buf, rows in packed], dtype=np.int64)
    with trace.phase("text.shuffle"):
        got = comm.alltoall(sizes)                       # row j: what rank j sends me
        buf = comm.alltoallv(np.concatenate([b for b, _ in packed]), sizes[:, 1], got[:, 1])
        rows = comm.alltoallv(np.concatenate([r for _, r in packed]), sizes[:, 0], got[:, 0])
    get = owned.get
    for tok, c in _unpack(buf, rows):
        owned[tok] = get(tok, 0) + c


# ----------------------------------------------------------------------- reduce
def _key(kv):
    return (-kv[1], kv[0])


def gather_pairs(comm, items, root: int = 0) -> list | None:
    """Every rank's (token, count) pairs on ``root`` (None elsewhere), as one list."""
    buf, rows = _pack(items)
    with trace.phase("text.gather"):
        sizes = comm.allgather(np.array([[len(rows), len(buf)]], dtype=np.int64))
        all_buf = comm.gather(buf, counts=sizes[:, 1], root=root)
        all_rows = comm.gather(rows, counts=sizes[:, 0], root=root)
    return list(_unpack(all_buf, all_rows)) if comm.rank == root else None


def top_k(comm, owned: dict, k: int, root: int = 0) -> list | None:
    """The global top ``k`` (count desc, then token) on ``root``: the top k of the union of
    every owner's top k, exact because each token is counted by one owner only."""
    mine = heapq.nsmallest(k, owned.items(), key=_key) if k > 0 else []
    union = gather_pairs(comm, mine, root)
    return None if union is None else heapq.nsmallest(k, union, key=_key)


def sorted_table(comm, owned: dict, root: int = 0) -> list | None:
    """The whole table on ``root``, sorted by count desc then token (code point order)."""
    allp = gather_pairs(comm, list(owned.items()), root)
    return None if allp is None else sorted(allp, key=_key)


# ----------------------------------------------------------------------- driver
def count_corpus(comm, paths, *, cjk: str = "chars", strict: bool = False, top: int = 20,
                 block_bytes: int = BLOCK_BYTES, spill_tokens: int = SPILL_TOKENS,
                 progress=None) -> CountResult:
    """Count the tokens of the files ``paths`` (directories: every file under them) over
    ``comm``. Collective. Bad input raises :class:`TextError` on every rank.

    progress: called on rank 0 after every block as ``progress(bytes_read, total_bytes)``.
    """
    if cjk not in CJK_MODES:
        raise TextError(f"--cjk must be one of {', '.join(CJK_MODES)}, got {cjk!r}")
    t0 = time.perf_counter()
    ev0 = len(trace.TRACER)
    files, sizes = survey(comm, paths)
    total = sum(sizes)
    reader = _Reader(files, sizes, comm, block_bytes, strict)
    blocks = reader.blocks()
    local, owned = Counter(), {}
    ntok = shuffles = 0
    err, more = None, True
    while True:
        if more and err is None:
            try:
                text = next(blocks, None)
                if text is None:
                    more = False
                else:
                    toks = tokenize(text, cjk)
                    ntok += len(toks)
                    local.update(toks)
            except TextError as e:
                err = str(e)
        flags = np.array([int(more and err is None), int(len(local) > spill_tokens),
                          int(err is not None), reader.bytes], dtype=np.int64)
        with trace.phase("text.agree"):
            any_more, any_over, any_err, nbytes = comm.allreduce(flags).tolist()
        if any_err:
            msgs = comm.allgather_obj(err)
            r = next(i for i, m in enumerate(msgs) if m is not None)
            raise TextError(msgs[r] if comm.size == 1 else f"rank {r}: {msgs[r]}")
        if progress is not None and comm.rank == 0:
            progress(nbytes, total)
        if any_over or not any_more:
            shuffle(comm, local, owned)
            local.clear()
            shuffles += 1
        if not any_more:
            break
    with trace.phase("text.totals"):
        ntok_all, distinct = comm.allreduce(np.array([ntok, len(owned)], dtype=np.int64)).tolist()
    best = top_k(comm, owned, top)
    return CountResult(owned, best, len(files), total, ntok_all, distinct,
                       time.perf_counter() - t0, shuffles,
                       collective_seconds(comm, trace.TRACER.events()[ev0:]))


def collective_seconds(comm, events) -> dict:
    """Seconds in each collective, the slowest rank's figure per op (collective)."""
    mine = np.zeros(len(REPORTED_OPS))
    for e in events:
        if e["op"] in REPORTED_OPS:
            mine[REPORTED_OPS.index(e["op"])] += e["t1"] - e["t0"]
    with trace.TRACER.disabled():
        worst = comm.allreduce(mine, op="max")
    return {op: float(s) for op, s in zip(REPORTED_OPS, worst) if s > 0}
