"""``mpifc text count``: argument parser, progress, summary and output files.

    mpiexec -n 4 mpifc text count corpus/ --top 20 --out runs/wc/counts.tsv
    mpiexec -n 4 mpifc text count a.txt b.txt --cjk bigrams --out counts.h5

:func:`add_text` registers the subcommand on the CLI's subparsers; the counting itself
is :func:`mpifc.text.wordcount.count_corpus`.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

OUT_KINDS = {".tsv": "tsv", ".txt": "tsv", ".h5": "h5", ".hdf5": "h5"}


def add_text(sub) -> None:
    t = sub.add_parser("text", help="text workloads: distributed word count")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = tsub.add_parser(
        "count", help="count word frequencies over a corpus split across the ranks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each rank reads a line-aligned share of the bytes, counts its tokens, "
        "and sends each (token, count) to the token's hash owner (alltoall + alltoallv); "
        "rank 0 gathers the owners' top K. Run under mpiexec for several ranks.",
        epilog="tokens: lower-cased words (letters, marks, digits; ' or \u2019 inside a word "
        "joins it);\nHan / Hiragana / Katakana as single characters or bigrams (--cjk).\n"
        "invalid UTF-8 bytes read as U+FFFD, which separates words; --strict refuses them,\n"
        "naming the file and byte offset. A corpus of 0 bytes is an error.")
    c.add_argument("corpus", nargs="+", metavar="CORPUS",
                   help="text files (UTF-8), or directories: every file under them")
    c.add_argument("--top", type=int, default=20, metavar="K",
                   help="print the K most frequent tokens (default %(default)s; 0: none)")
    c.add_argument("--out", default=None,
                   help="write every token's count: .tsv (token<TAB>count) or .h5")
    c.add_argument("--cjk", choices=["chars", "bigrams"], default="chars",
                   help="CJK text as single characters or character bigrams (default %(default)s)")
    c.add_argument("--strict", action="store_true",
                   help="refuse invalid UTF-8 (default: read it as U+FFFD)")
    c.add_argument("--trace-dir", default=None,
                   help="where the trace goes (default: beside --out; none without either)")
    c.add_argument("--block-mb", type=float, default=8.0,
                   help="MB read per block between agreements (default %(default)s)")
    c.add_argument("--spill-tokens", type=int, default=1_000_000,
                   help="shuffle early when a rank holds more distinct unshuffled tokens "
                        "(default %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=cmd_count)


class Progress:
    """Bytes read, on rank 0: a line rewritten in place on a terminal, else a line every 5 s."""

    def __init__(self, enabled: bool, every_s: float = 5.0):
        self.enabled, self.every = enabled, every_s
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every:
            return
        self.last = now
        rate = done / 1e6 / max(now - self.t0, 1e-9)
        line = (f"text count: {done / 1e6:.1f} of {total / 1e6:.1f} MB read "
                f"({100 * done / max(total, 1):.0f} %), {rate:.1f} MB/s")
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# ----------------------------------------------------------------------- output files
def write_tsv(path: str, table) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{tok}\t{c}\n" for tok, c in table)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_h5(path: str, table, attrs: dict) -> None:
    """Datasets ``tokens`` (variable-length UTF-8 strings) and ``counts`` (int64), same order."""
    import h5py
    import numpy as np

    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=[t for t, _ in table],
                             dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("counts", data=np.array([c for _, c in table], dtype=np.int64))
            f.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_output(comm, res, path: str, cjk: str) -> None:
    """Gather the whole table to rank 0 and write it there (collective; errors on all ranks)."""
    from mpifc.text.wordcount import TextError, sorted_table

    table = sorted_table(comm, res.counts)
    status = None
    if comm.rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if OUT_KINDS[os.path.splitext(path)[1].lower()] == "tsv":
                write_tsv(path, table)
            else:
                write_h5(path, table, {"total_tokens": res.tokens, "distinct_tokens": res.distinct,
                                       "bytes": res.bytes, "files": res.files, "cjk": cjk,
                                       "order": "count desc, then token"})
        except OSError as e:
            status = f"{path}: cannot write: {e.strerror or e}"
    status = comm.bcast_obj(status)
    if status is not None:
        raise TextError(status)


def _trace_place(args) -> tuple[str, str] | None:
    if args.trace_dir:
        return args.trace_dir, "trace"
    if args.out:
        stem = os.path.splitext(os.path.basename(args.out))[0]
        return os.path.dirname(os.path.abspath(args.out)), f"{stem}.trace"
    return None


def _write_trace(comm, outdir: str, prefix: str):
    from mpifc.comm.collect import write_trace

    if comm.rank == 0:           # a rank file left by an earlier, larger job would mix in
        for f in glob.glob(os.path.join(glob.escape(outdir), f"{glob.escape(prefix)}.rank*.jsonl")):
            m = re.search(r"\.rank(\d+)\.jsonl$", f)
            if m and int(m.group(1)) >= comm.size:
                os.remove(f)
    return write_trace(comm, outdir, prefix=prefix)


def _check_args(args):
    from mpifc.text.wordcount import TextError

    if args.top < 0:
        raise TextError(f"--top must be >= 0, got {args.top}")
    if args.block_mb <= 0 or args.spill_tokens < 1:
        raise TextError("--block-mb must be > 0 and --spill-tokens >= 1")
    if args.out:
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in OUT_KINDS:
            raise TextError(f"--out {args.out}: the name must end in .tsv, .txt, .h5 or .hdf5")


def format_summary(res, nranks: int) -> str:
    coll = ", ".join(f"{op} {s:.3f} s" for op, s in res.collective_seconds.items())
    return (f"{res.files} file(s), {res.bytes / 1e6:.1f} MB, {res.tokens} tokens, "
            f"{res.distinct} distinct, {res.seconds:.2f} s, {res.mb_per_s:.1f} MB/s on "
            f"{nranks} rank(s), {res.shuffles} shuffle(s)\n"
            f"time in collectives (slowest rank): {coll}")


def cmd_count(args) -> None:
    from mpifc.comm import trace, world
    from mpifc.comm.collect import sync_clock
    from mpifc.text.wordcount import TextError, count_corpus

    comm = world()
    trace.reset()
    trace.enable()
    sync_clock(comm)
    prog = Progress(comm.rank == 0 and not args.quiet)
    try:
        _check_args(args)            # the same arguments on every rank: no agreement needed
        res = count_corpus(comm, args.corpus, cjk=args.cjk, strict=args.strict, top=args.top,
                           block_bytes=max(1, int(args.block_mb * 2 ** 20)),
                           spill_tokens=args.spill_tokens, progress=prog)
        prog.close()
        if args.out:
            write_output(comm, res, args.out, args.cjk)
    except TextError as e:          # raised on every rank at the same point
        prog.close()
        if comm.rank == 0:
            print(f"mpifc text count: {e}", file=sys.stderr, flush=True)
        comm.barrier()               # rank 0 has printed before any rank exits non-zero
        raise SystemExit(1)
    place = _trace_place(args)
    paths = _write_trace(comm, *place) if place else None
    if comm.rank != 0:
        return
    if res.top:
        w = max(len(t) for t, _ in res.top)
        print(f"top {len(res.top)} of {res.distinct} distinct tokens:")
        for tok, c in res.top:
            print(f"  {tok:<{w}}  {c}")
    print(format_summary(res, comm.size))
    if args.out:
        print(f"wrote {args.out} ({res.distinct} tokens, count desc then token)")
    if paths:
        print(f"trace {paths['chrome']} (Perfetto / chrome://tracing); summary {paths['summary']}",
              flush=True)
