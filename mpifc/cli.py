"""mpifc command line: ``mpifc SUBCOMMAND --help`` for each.

Launch multi-rank work with ``mpiexec -n N mpifc ...``. The entry point installs
the abort handler first, so an exception on any rank ends the whole job.
"""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_demo(args):
    from mpifc.demo import run
    run(args.out)


def _cmd_trace(args):
    import glob
    import json
    import re

    from mpifc.comm.trace import format_summary, merge_chrome, read_jsonl, summarize

    def natural(name):         # trace.rank10.jsonl after trace.rank2.jsonl: tracks in rank order
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    files = sorted({f for p in args.files for f in (glob.glob(p) or [p])}, key=natural)
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


def _given(value, default):
    """A command-line value, or the dataset's default when it was not given (None)."""
    return default if value is None else value


def _cmd_data_prepare(args):
    import os

    from mpifc.data import DatasetError, prepare

    if args.name in ("text", "synthetic-text"):        # issue 13: text datasets (collective)
        from mpifc.data.textprep import cmd_prepare_text
        return cmd_prepare_text(args, lambda p: _cmd_inspect(argparse.Namespace(file=p)))
    out = args.out or os.path.join("runs", "data", f"{args.name}.h5")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    kw = {"compression": args.compression}
    try:
        if args.encrypt_key_file:             # encryption at rest: key from a file only
            from mpifc.security.crypt import CryptError, read_key_file
            try:
                kw["encrypt_key"] = read_key_file(args.encrypt_key_file)
                kw["encrypt_key"].aead()      # cryptography installed? (one-line hint if not)
            except CryptError as e:
                raise DatasetError(str(e)) from None
        if args.name in ("mnist", "cifar10"):
            if not args.source:
                raise SystemExit(f"mpifc data prepare {args.name}: give the directory holding the "
                                 "original files (SOURCE)")
            path = prepare.CONVERTERS[args.name](args.source, out, **kw)
        elif args.name == "synthetic":
            shape = tuple(int(v) for v in args.shape.split(","))
            path = prepare.prepare_synthetic(
                out, n_train=_given(args.n_train, 10000), n_test=_given(args.n_test, 2000),
                shape=shape, num_classes=_given(args.classes, 10), seed=args.seed, **kw)
        else:
            path = prepare.prepare_digits(out, **kw)
    except DatasetError as e:
        raise SystemExit(f"mpifc data prepare {args.name}: {e}")
    print(f"wrote {path}")
    _cmd_inspect(argparse.Namespace(file=path))


def _cmd_inspect(args):
    """Print the summary; exit 1 when a checkpoint's digest does not match."""
    from mpifc.checkpoint import CheckpointError
    from mpifc.checkpoint.describe import inspect
    from mpifc.data import DatasetError

    try:
        text, problem = inspect(args.file, verify_key=getattr(args, "pubkey", None))
    except (CheckpointError, DatasetError, OSError, ValueError) as e:
        raise SystemExit(f"mpifc inspect: {e}")
    print(text, flush=True)
    if problem:
        raise SystemExit(f"mpifc inspect: {problem}")


def _config_or_exit(source, overrides, cmd):
    """The config every rank agrees on (rank 0 reads it); on a mistake, one line from
    rank 0 and a non-zero exit on every rank -- a file that only some ranks see included."""
    from mpifc.comm import world
    from mpifc.config import ConfigError, load_config_agreed

    comm = world()
    try:
        return load_config_agreed(source, overrides, comm)
    except ConfigError as e:
        raise SystemExit(f"mpifc {cmd}: {e}")     # agreed: printed once, by rank 0


def _cmd_train(args):
    from mpifc.train import train

    import json                         # --pubkey as a TOML string, whatever the path looks like
    sets = args.set + ([f"train.watchdog_s={args.watchdog}"] if args.watchdog is not None else [])
    sets += [f"train.verify_key={json.dumps(args.pubkey)}"] if args.pubkey else []
    sets += [f"train.device={args.device}"] if args.device else []     # issue 15
    sets += [f"train.early_stop={args.early_stop}"] if args.early_stop is not None else []
    cfg = _config_or_exit(args.config, sets, "train")
    if args.print_config:
        from mpifc.comm import world
        from mpifc.config import to_toml

        if world().rank == 0:
            print(to_toml(cfg), end="")
        return
    train(cfg, quiet=args.quiet, resume=args.resume, out=args.out, overwrite=args.overwrite,
          progress=args.progress)


def stored_run_config(comm, target: str, cmd: str, *, verify_key=None, overrides=(),
                      check=None) -> tuple[str, dict]:
    """(checkpoint path, its run's config laid out for this job), agreed on every rank.

    Rank 0 verifies the checkpoint (digest; with ``verify_key`` the signature) and reads
    its config; ``check()`` may add a problem of the caller's (a message or None). The
    saved layout may not fit this job: the saved tp when it divides the job, else
    tp = 1; dp follows from the job size. Any problem: ``mpifc CMD: ...``, once.
    """
    from mpifc.checkpoint import CheckpointError, stored_config
    from mpifc.config import ConfigError, loads_config

    got = None
    if comm.rank == 0:             # rank 0 reads and verifies for all: nobody splits off
        try:
            got = ("ok", *stored_config(target, verify_key=verify_key))
            problem = check() if check else None
            if problem:
                got = ("error", problem, None)
        except (CheckpointError, ValueError) as e:     # ValueError: a bad --pubkey file
            got = ("error", str(e), None)
    status, path, text = comm.bcast_obj(got)
    if status == "error":
        raise SystemExit(f"mpifc {cmd}: {path}")
    if text is None:
        raise SystemExit(f"mpifc {cmd}: {path} holds no config; it was not written by mpifc train")
    try:
        saved = loads_config(text)
        tp = saved["parallel"]["tp"] if comm.size % max(saved["parallel"]["tp"], 1) == 0 else 1
        return path, loads_config(text, overrides=["parallel.dp=0", f"parallel.tp={tp}",
                                                   *overrides])
    except ConfigError as e:
        raise SystemExit(f"mpifc {cmd}: {e}")


def _eval_target(path: str, best: bool) -> str:
    """A checkpoint file, a checkpoint directory, or a run directory (its checkpoints/);
    with ``best``, that directory's ``best.h5``."""
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if best:
        from mpifc.train import BEST_NAME

        from mpifc.checkpoint import CheckpointError

        if not os.path.isdir(path):
            raise CheckpointError(f"--best needs a run or checkpoint directory, got {path}")
        path = os.path.join(path, BEST_NAME)
    return path


def _cmd_eval(args):
    """Evaluate a checkpoint on the test split, under any layout that fits the job."""
    from mpifc.checkpoint import load
    from mpifc.comm import world
    from mpifc.train import Trainer

    comm = world()
    # issue 15: the device is this job's (a GPU run's checkpoint evaluates on a CPU node)
    sets = [f"train.device={args.device}"] + args.set
    path, cfg = stored_run_config(comm, _eval_target(args.checkpoint, args.best), "eval",
                                  verify_key=args.pubkey, overrides=sets)
    from mpifc.rundir import stored_data_paths
    from mpifc.security.inputs import eval_config   # the stored config decides no writes
    cfg = stored_data_paths(cfg, path)          # relative paths of older checkpoints
    cfg = eval_config(cfg, sets)
    tr = Trainer(cfg, quiet=True, comm=comm, out=args.out or os.path.dirname(os.path.dirname(path)))
    info = load(path, tr.model, None, tr.grid, verify_key=args.pubkey, key=tr.ckpt_key)
    res = tr.evaluate()
    if comm.rank == 0:
        lay = info["layout"]
        print(f"{path}: step {info['step']}, saved as dp={lay['dp']} x tp={lay['tp']}, "
              f"evaluated as dp={tr.grid.dp} x tp={tr.grid.tp}")
        print(f"test_loss {res['test_loss']:.6f}  test_acc {res['test_acc']:.4f}  "
              f"({tr.test_loader.plan.n} samples of {tr.data_path})")


class _Parser(argparse.ArgumentParser):
    """argparse, printing (help, usage errors, --version) from rank 0 only under mpiexec."""

    def _print_message(self, message, file=None):
        from mpifc.comm import world

        if world().rank == 0:
            super()._print_message(message, file)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mpifc")
    except PackageNotFoundError:        # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpifc", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    pr.add_argument("name", choices=["digits", "mnist", "cifar10", "synthetic", "text",
                                     "synthetic-text"])
    pr.add_argument("source", nargs="?", help="directory of the original files (mnist, cifar10); "
                    "text: a folder per class of text files, or CSV/TSV")
    pr.add_argument("--out", help="output .h5 (default runs/data/NAME.h5)")
    pr.add_argument("--compression", choices=["gzip", "lzf"], default=None)
    pr.add_argument("--shape", default="3,32,32", help="synthetic: C,H,W or D")
    pr.add_argument("--n-train", type=int, default=None,
                    help="synthetic: 10000 (default); synthetic-text: 8000 (default)")
    pr.add_argument("--n-test", type=int, default=None, help="synthetic, synthetic-text: 2000")
    pr.add_argument("--classes", type=int, default=None,
                    help="synthetic: 10 (default); synthetic-text: 4 (default, at most 6)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--encrypt-key-file", metavar="KEY_FILE",
                    help="write the file AES-256-GCM encrypted with the key in KEY_FILE (make one "
                    "with `mpifc keys generate-data-key`); read it with data.key_file")
    tx = pr.add_argument_group("text (README: text datasets)")
    tx.add_argument("--format", choices=["folders", "csv"], default=None,
                    help="text SOURCE layout (default: folders for a directory without "
                    "train.csv/test.csv, else csv)")
    tx.add_argument("--label-column", default="0", help="csv: label column, index or name")
    tx.add_argument("--text-column", default="1",
                    help="csv: text column(s), index or name; '1,2' joins several")
    tx.add_argument("--min-freq", type=int, default=1, help="keep tokens seen this often in train")
    tx.add_argument("--max-vocab", type=int, default=None,
                    help="vocabulary size incl. <pad>, <unk>")
    tx.add_argument("--cjk", choices=["chars", "bigrams"], default="chars")
    tx.add_argument("--test-fraction", type=float, default=0.2,
                    help="test share when SOURCE holds one split")
    tx.add_argument("--only-classes", default=None,
                    help="folders: class folders to use, comma separated (e.g. neg,pos)")
    pr.set_defaults(func=_cmd_data_prepare)

    tr = sub.add_parser("train", help="train a config or preset (run under mpiexec for several ranks)",
                        description="Train CONFIG (a TOML file) or a preset: "
                        "digits-mlp, digits-cnn, cifar-cnn. Example: "
                        "mpiexec -n 2 mpifc train digits-cnn --set parallel.tp=2")
    tr.add_argument("config", help="TOML config file or preset name")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. train.epochs=3 (repeatable)")
    tr.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                    help="continue from a checkpoint (default: the run's latest, if any)")
    tr.add_argument("--out", help="run directory (default: train.out, runs/<name>)")
    tr.add_argument("--overwrite", action="store_true",
                    help="delete the run directory's previous outputs (metrics, checkpoints, "
                    "trace) first")
    tr.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                    help="rank 0's progress: a bar (terminal), a plain line every 10 s on stderr "
                    "(batch logs; what auto picks under mpiexec), or none")
    tr.add_argument("--quiet", action="store_true", help="no progress or per-epoch lines")
    tr.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                    help="train.device: cpu, cuda (one GPU per rank), auto (README: GPUs)")
    tr.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                    help="abort the job, naming the slow rank(s), when a step takes longer "
                         "(train.watchdog_s; 0 = off)")
    tr.add_argument("--pubkey", metavar="PUB", help="resume only from a checkpoint signed by "
                    "this public key (sets train.verify_key)")
    tr.add_argument("--early-stop", type=int, default=None, metavar="N",
                    help="stop after N epochs without a lower val_loss (test_loss without "
                         "data.validation_split) (train.early_stop; 0 = off)")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved config (defaults + overrides) and exit")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    ev.add_argument("checkpoint", help="checkpoint file, or a checkpoint or run directory "
                    "(its latest)")
    ev.add_argument("--best", action="store_true",
                    help="the directory's best.h5 (best by train.keep_best) instead of its latest")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the stored config, e.g. parallel.tp=1")
    ev.add_argument("--out", help="run directory for the evaluation (default: the checkpoint's)")
    ev.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="where to evaluate (default auto: cuda when every rank sees a GPU)")
    ev.add_argument("--pubkey", metavar="PUB", help="refuse a checkpoint not signed by this "
                    "public key, or altered since, before its config or tensors are used")
    ev.set_defaults(func=_cmd_eval)

    ins = sub.add_parser("inspect", help="summarise a dataset or checkpoint file")
    ins.add_argument("file")
    ins.add_argument("--pubkey", metavar="PUB", help="verify a checkpoint's signature; exit 1 "
                     "when it is unsigned, signed by another key or altered")
    ins.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("trace", help="summarise or merge per-rank trace files (JSON lines)")
    t.add_argument("action", choices=["summary", "export"])
    t.add_argument("files", nargs="+", help="per-rank .jsonl files (globs allowed)")
    t.add_argument("-o", "--output", default="trace.chrome.json", help="merged Chrome trace (export)")
    t.set_defaults(func=_cmd_trace)

    from mpifc.sim.commands import add_calibrate, add_simulate   # the simulator's commands
    add_calibrate(sub)
    add_simulate(sub)
    from mpifc.text.commands import add_text                      # mpifc text count
    add_text(sub)
    from mpifc.security.commands import add_security              # keys, sign, verify
    add_security(sub)
    # --- issue 18: predict, export, plot ---
    from mpifc.predict import add_predict                         # mpifc predict
    add_predict(sub)
    from mpifc.export import add_export                           # mpifc export
    add_export(sub)
    from mpifc.plot import add_plot                               # mpifc plot
    add_plot(sub)
    return p


def main(argv=None) -> int:
    """Run one command; returns its exit status (see mpifc.comm.abort for failures)."""
    from mpifc.comm import exit_code, install_abort_handler

    install_abort_handler()
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (Exception, SystemExit) as e:     # UserError, SystemExit: one line, printed once
        return exit_code(e)                  # anything else is re-raised: a traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
