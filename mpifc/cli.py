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


def _cmd_data_prepare(args):
    import os

    from mpifc.data import DatasetError, prepare

    out = args.out or os.path.join("runs", "data", f"{args.name}.h5")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    kw = {"compression": args.compression}
    try:
        if args.name in ("mnist", "cifar10"):
            if not args.source:
                raise SystemExit(f"mpifc data prepare {args.name}: give the directory holding the "
                                 "original files (SOURCE)")
            path = prepare.CONVERTERS[args.name](args.source, out, **kw)
        elif args.name == "synthetic":
            shape = tuple(int(v) for v in args.shape.split(","))
            path = prepare.prepare_synthetic(out, n_train=args.n_train, n_test=args.n_test,
                                             shape=shape, num_classes=args.classes,
                                             seed=args.seed, **kw)
        else:
            path = prepare.prepare_digits(out, **kw)
    except DatasetError as e:
        raise SystemExit(f"mpifc data prepare {args.name}: {e}")
    print(f"wrote {path}")
    _cmd_inspect(argparse.Namespace(file=path))


def _cmd_inspect(args):
    from mpifc.checkpoint import CheckpointError, describe
    from mpifc.data import DatasetError

    try:
        print(describe(args.file))
    except (CheckpointError, DatasetError, OSError, ValueError) as e:
        raise SystemExit(f"mpifc inspect: {e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpifc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run every collective once and print the traced summary")
    d.add_argument("--out", default="runs/demo", help="directory for the trace files")
    d.set_defaults(func=_cmd_demo)

    dp = sub.add_parser("data", help="datasets: convert to the mpifc HDF5 format")
    dsub = dp.add_subparsers(dest="action", required=True, metavar="ACTION")
    pr = dsub.add_parser("prepare", help="write an mpifc HDF5 dataset",
                         description="digits: scikit-learn's bundled copy (offline); mnist: "
                         "the four IDX files in SOURCE; cifar10: the python batches in SOURCE; "
                         "synthetic: learnable class prototypes + noise of any size")
    pr.add_argument("name", choices=["digits", "mnist", "cifar10", "synthetic"])
    pr.add_argument("source", nargs="?", help="directory of the original files (mnist, cifar10)")
    pr.add_argument("--out", help="output .h5 (default runs/data/NAME.h5)")
    pr.add_argument("--compression", choices=["gzip", "lzf"], default=None)
    pr.add_argument("--shape", default="3,32,32", help="synthetic: C,H,W or D")
    pr.add_argument("--n-train", type=int, default=10000)
    pr.add_argument("--n-test", type=int, default=2000)
    pr.add_argument("--classes", type=int, default=10)
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=_cmd_data_prepare)

    ins = sub.add_parser("inspect", help="summarise a dataset or checkpoint file")
    ins.add_argument("file")
    ins.set_defaults(func=_cmd_inspect)

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
