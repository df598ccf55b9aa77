"""mpifc command line: ``mpifc SUBCOMMAND --help`` for each.

Launch multi-rank work with ``mpiexec -n N mpifc ...``. The entry point installs
the abort handler first, so an exception on any rank ends the whole job.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args):
    from mpifc.demo import run
    run(args.out)


def _cmd_trace(args):
    import glob
    import json

    from mpifc.comm.trace import format_summary, merge_chrome, read_jsonl, summarize

    files = sorted(f for p in args.files for f in (glob.glob(p) or [p]))
    per_rank = []
    for f in files:
        try:
            per_rank.append(read_jsonl(f))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"mpifc trace: cannot read {f}: {e}")
    if args.action == "summary":
        print(format_summary(summarize([e for evs in per_rank for e in evs]),
                             title=f"communication summary, {len(files)} file(s)"))
    else:
        merge_chrome(per_rank, args.output)
        print(f"wrote {args.output} ({sum(map(len, per_rank))} events, {len(files)} ranks)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpifc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run every collective once and print the traced summary")
    d.add_argument("--out", default="runs/demo", help="directory for the trace files")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("trace", help="summarise or merge per-rank trace files (JSON lines)")
    t.add_argument("action", choices=["summary", "export"])
    t.add_argument("files", nargs="+", help="per-rank .jsonl files (globs allowed)")
    t.add_argument("-o", "--output", default="trace.chrome.json", help="merged Chrome trace (export)")
    t.set_defaults(func=_cmd_trace)
    return p


def main(argv=None) -> int:
    from mpifc.comm import install_abort_handler

    install_abort_handler()
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
