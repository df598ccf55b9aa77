"""The trainer: a config in; a trained model, metrics, checkpoints and a trace out.

    mpiexec -n 2 mpifc train digits-cnn [--set parallel.tp=2] [--resume]

One step, on every rank of a dp x tp grid:

    batch     the loader gives this dp rank its rows of the global batch (tp ranks: same rows)
    forward   sharded layers talk over tp; the loss (class-parallel when the logits are
              sharded) allreduces over tp
    backward  gradients; data-parallel buckets allreduce over dp, overlapped with backward
    update    clip (norm completed over the grid), optimizer on the local shards

Rank 0 writes ``<out>/metrics.jsonl`` (one record per epoch, and one per
``train.log_every`` steps), checkpoints go to ``<out>/checkpoints`` (the best by
``train.keep_best`` also as ``best.h5``), the trace to ``<out>/trace``. ``train()``
claims the run directory first (:mod:`mpifc.rundir`: a lock, one run per directory).
A NaN or Inf loss stops training with a message naming the step, and naming the data
when the batch held non-finite input.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from mpifc.comm import Grid, job_in_progress, trace, watchdog, world
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.config import to_toml
from mpifc.errors import UserError
from mpifc.optim.early_stop import watched_loss


BEST_NAME = "best.h5"     # in the checkpoint directory: the best checkpoint by train.keep_best


class TrainingError(UserError, RuntimeError, all_ranks=True):
    """Training cannot go on (non-finite loss, a dataset that does not fit the model)."""


# ---------------------------------------------------------------------- set-up helpers
def setup_threads(comm) -> int:
    """One BLAS pool per rank sized to the cores it owns (a user's OMP_NUM_THREADS wins)."""
    from mpifc.threads import apply_blas_threads

    with trace.disabled():
        node = comm.split_shared()
    return apply_blas_threads(node.size)


def _is_dataset_path(name: str) -> bool:
    return name.endswith((".h5", ".hdf5")) or os.path.sep in name


def absolute_data_paths(cfg: dict) -> dict:
    """``cfg`` with ``data.dir`` and a path ``data.dataset`` made absolute (against the cwd).

    Relative paths in a config mean "from where the job starts"; the trainer stores
    the absolute form in checkpoints, so ``mpifc eval DIR`` works from any directory.
    """
    d = cfg["data"]
    name = d["dataset"]
    fixed = {"dir": os.path.abspath(d["dir"]),
             "dataset": os.path.abspath(name) if _is_dataset_path(name) else name}
    if all(d[k] == v for k, v in fixed.items()):
        return cfg
    return {**cfg, "data": {**d, **fixed}}


def named_dataset_path(cfg: dict) -> str:
    """Where a named dataset (digits, synthetic, ...) lives: ``data.dir/<name>[-<shape>].h5``."""
    name = cfg["data"]["dataset"]
    shape = cfg["model"]["input"]
    tag = "-" + "x".join(map(str, shape)) if name in ("synthetic", "synthetic-images") else ""
    return os.path.join(cfg["data"]["dir"], f"{name}{tag}.h5")


def resolve_dataset(cfg: dict, comm) -> str:
    """Path of the HDF5 dataset; a named dataset is prepared once, by rank 0, if missing."""
    from mpifc.data import prepare, textprep

    from mpifc.config import ConfigError
    from mpifc.data import DatasetError

    name = cfg["data"]["dataset"]
    if _is_dataset_path(name):
        # rank 0 looks for every rank: a file only some ranks see must not split them
        if not comm.bcast_obj(os.path.exists(name) if comm.rank == 0 else None):
            raise DatasetError(f"dataset {name!r} not found; create it with "
                               "`mpifc data prepare ...`")
        return name
    shape = tuple(cfg["model"]["input"])
    builders = {
        "digits": lambda out: prepare.prepare_digits(out),
        "synthetic-images": lambda out: prepare.prepare_synthetic(
            out, n_train=4096, n_test=1024, shape=shape, num_classes=10, seed=cfg["seed"]),
        "synthetic": lambda out: prepare.prepare_synthetic(
            out, n_train=8192, n_test=1024, shape=shape, num_classes=10, seed=cfg["seed"]),
        # issue 13: the bundled text set, generated (a fixed seed: the same set for every run)
        "synthetic-text": lambda out: textprep.prepare_synthetic_text(
            out, n_train=8000, n_test=2000, num_classes=4, seed=0),
    }
    if name not in builders:
        raise ConfigError(f"data.dataset {name!r}: expected a .h5 path or one of {sorted(builders)}")
    path = named_dataset_path(cfg)
    err = None
    if comm.rank == 0 and not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            builders[name](tmp)
            os.replace(tmp, path)        # never leave a half-written dataset behind
        except Exception as e:           # shared below so every rank raises, none waits
            err = f"{type(e).__name__}: {e}"
    err = comm.bcast_obj(err, root=0)
    if err:
        raise DatasetError(f"preparing dataset {name!r} failed on rank 0: {err}")
    return path


def check_data_fits_model(loader, model_cfg: dict, path: str) -> None:
    """Raise TrainingError unless the samples are what ``model.input`` says (issue 13: a
    text dataset needs ``input = ["tokens"...]`` and an embeddingbag ``vocab`` that holds
    every id of the file, ``vocab >= vocab_size``)."""
    from mpifc.models import is_text_input

    want = model_cfg["input"]
    if loader.text or is_text_input(want):
        if not (loader.text and is_text_input(want)):
            raise TrainingError(f"{path}: a {'text' if loader.text else 'non-text'} dataset "
                                f"but model.input is {list(want)} (text: [\"tokens\"])")
        vocab = (model_cfg.get("layers") or [{}])[0].get("vocab", 0)
        if vocab < loader.vocab_size:
            raise TrainingError(f"{path}: the vocabulary has {loader.vocab_size} ids but the "
                                f"embeddingbag has vocab = {vocab}; set model.layers[0].vocab "
                                f">= {loader.vocab_size}")
    elif tuple(loader.sample_shape) != tuple(want):
        raise TrainingError(f"{path}: samples are {tuple(loader.sample_shape)} "
                            f"but model.input is {tuple(want)}")


def build_optimizer(cfg: dict, params):
    from mpifc import optim

    o = cfg["optim"]
    if o["name"] == "sgd":
        return optim.SGD(params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                         weight_decay=o["weight_decay"])
    cls = optim.Adam if o["name"] == "adam" else optim.AdamW
    return cls(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
               weight_decay=o["weight_decay"])


def build_schedule(cfg: dict, opt, steps_per_epoch: int, note=None):
    """The LR schedule and when it steps: ("step" | "epoch" | "metric", schedule) or None.

    ``schedule.min_lr`` is the floor of every schedule. The cosine spans
    ``train.epochs`` (``train.max_steps`` only cuts the run, so a cut run resumed
    continues the same curve); a warm-up not shorter than that span is shortened to a
    tenth of it, and ``note`` (a callable taking one line) is told.
    """
    from mpifc import optim

    s = cfg["schedule"]
    if s["name"] == "step":
        return "epoch", optim.StepLR(opt, step_size=s["step_size"], gamma=s["gamma"],
                                     min_lr=s["min_lr"])
    if s["name"] == "cosine":
        epochs = cfg["train"]["epochs"]
        total = epochs * steps_per_epoch
        warmup = s["warmup_steps"]
        if warmup >= total:
            warmup = total // 10
            if note is not None:
                note(f"schedule.warmup_steps = {s['warmup_steps']} is not shorter than the run "
                     f"({epochs} epoch(s) x {steps_per_epoch} steps = {total} steps): warm-up "
                     f"shortened to {warmup} steps, a tenth of the run")
        return "step", optim.CosineWarmup(opt, warmup_steps=warmup, total_steps=total,
                                          min_lr=s["min_lr"])
    if s["name"] == "plateau":
        return "metric", optim.ReduceLROnPlateau(opt, mode="min", factor=s["factor"],
                                                 patience=s["patience"], min_lr=s["min_lr"])
    return None


def schedule_state(sched) -> dict:
    """A schedule's position (its counters; the settings come from the config), JSON-able."""
    return sched.state_dict()


PROGRESS_MODES = ("auto", "bar", "lines", "none")


def progress_mode(requested: str, show: bool) -> str:
    """The display rank 0 uses: "bar" (a tqdm bar) in a terminal, "lines" otherwise.

    ``auto`` picks "bar" only when stderr is a terminal. Under ``mpiexec`` it never is
    (MPICH's hydra pipes every rank's stderr and passes nothing that tells whether
    its own is a terminal), so jobs get "lines": one plain line every
    :data:`Progress.LINE_EVERY_S` seconds, which batch logs keep as well.
    """
    if requested not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {requested!r}")
    if not show or requested == "none":
        return "none"
    if requested == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return requested


class Progress:
    """Rank 0's progress: a tqdm bar per epoch, plain lines on stderr, or nothing.

    Lines: the first step of the session, then one every ``LINE_EVERY_S`` seconds::

        progress: epoch 3/12  step 17/23  loss 0.1234  4510 samples/s  ETA 0:00:41
    """

    LINE_EVERY_S = 10.0

    def __init__(self, mode: str, steps: int, epochs: int):
        self.mode, self.steps, self.epochs = mode, steps, epochs
        self.bar = None
        self.epoch = 0
        self.t0 = self.last = None
        self.done = self.samples = 0

    def start_epoch(self, epoch: int, first: int) -> None:
        self.epoch, self.step = epoch, first
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, initial=first,
                            desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, loss: float, samples: int) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
        if self.mode != "lines":
            return
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        else:
            self.done += 1
            self.samples += samples
        if self.last is None or now - self.last >= self.LINE_EVERY_S:
            self.last = now
            left = (self.epochs - self.epoch - 1) * self.steps + self.steps - self.step
            rate, eta = "", ""
            if self.done and now > self.t0:
                rate = f"  {self.samples / (now - self.t0):.0f} samples/s"
                secs = int(left * (now - self.t0) / self.done)
                eta = f"  ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
            print(f"progress: epoch {self.epoch + 1}/{self.epochs}  step {self.step}/"
                  f"{self.steps}  loss {loss:.4f}{rate}{eta}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def generators(module, prefix: str = "") -> dict:
    """Every numpy Generator a layer draws from (dropout masks), by qualified name."""
    out = {}
    rng = getattr(module, "_rng", None)
    if isinstance(rng, np.random.Generator):
        out[prefix or "model"] = rng
    for name, child in zip(module._names_of_children(), module._children):
        out.update(generators(child, f"{prefix}.{name}" if prefix else name))
    return out


def _agree_finite(comm, value: float) -> bool:
    """True on every rank when ``value`` is finite on every rank (one allreduce)."""
    with trace.phase("check.finite"):
        bad = comm.allreduce(np.array([0.0 if math.isfinite(value) else 1.0]), op="max")
    return not bad[0]


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Builds data, model, optimizer and schedule from a config on ``comm`` (the world).

    ``run()`` trains; ``save()``/``resume()`` write and read checkpoints;
    ``evaluate()`` returns test loss and accuracy.
    """

    def __init__(self, cfg: dict, *, quiet: bool = False, comm=None, out: str | None = None,
                 progress: str = "auto"):
        from mpifc.models import build_model
        from mpifc.parallel import DataParallel

        self.cfg = cfg = absolute_data_paths(cfg)    # stored in checkpoints: any cwd reads it
        self.comm = comm or world()
        self.quiet = quiet
        self.rank0 = self.comm.rank == 0
        self.progress = progress_mode(progress, self.rank0 and not quiet)
        self.threads = setup_threads(self.comm)
        p, t = cfg["parallel"], cfg["train"]
        self.grid = Grid(self.comm, dp=p["dp"] or None, tp=p["tp"] or None)
        self.dtype = np.dtype(t["dtype"])
        self.out = out or t["out"].format(name=cfg["name"])
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if self.rank0:
            os.makedirs(self.ckpt_dir, exist_ok=True)

        from mpifc.security.crypt import config_keys      # encryption at rest (collective)
        self.data_key, self.ckpt_key = config_keys(cfg, self.comm)
        self.data_path = resolve_dataset(cfg, self.comm)
        dc = self.grid.dp_comm
        # --- issue 18 item 3: train rows (less data.validation_split, augmented), validation,
        # test (mpifc.data.pipeline); early stopping on the watched loss (mpifc.optim.early_stop)
        from mpifc.data.pipeline import training_loaders
        from mpifc.optim.early_stop import EarlyStopping

        self.loader, self.val_loader, self.test_loader = training_loaders(
            cfg, self.data_path, dc, dtype=self.dtype, key=self.data_key)
        self.early = EarlyStopping(t.get("early_stop", 0))
        # --- end issue 18 item 3
        check_data_fits_model(self.loader, cfg["model"], self.data_path)
        from mpifc.security.signing import check_keys   # security: bad key files fail now
        check_keys(cfg, self.comm)
        self.model = build_model(cfg["model"], self.grid, seed=cfg["seed"], dtype=self.dtype)
        if self.loader.num_classes > self.model.num_classes:
            raise TrainingError(f"the dataset has {self.loader.num_classes} classes but the "
                                f"model's last layer has {self.model.num_classes} outputs")
        self.dp = DataParallel(self.model, dc, bucket_mb=p["bucket_mb"], overlap=p["overlap"])
        self.opt = build_optimizer(cfg, self.model.parameters())
        self.sched = build_schedule(cfg, self.opt, self.loader.steps_per_epoch,
                                    note=self._note)
        self.step = 0
        self.saved: str | None = None      # the last checkpoint this session wrote
        self.best: dict | None = None      # {"metric", "value", "step"} of checkpoints/best.h5
        self.exposed_s = 0.0     # seconds posting and waiting for the overlapped dp allreduce
        if self.rank0 and not quiet:
            print(f"mpifc train {cfg['name']}: {self.comm.size} rank(s) as dp={self.grid.dp} x "
                  f"tp={self.grid.tp}, {self.threads} BLAS thread(s) per rank, "
                  f"{self.loader.steps_per_epoch} steps/epoch of {t['batch_size']} samples"
                  + (f" in {t['accumulate']} micro-batches" if t.get("accumulate", 1) > 1 else "")
                  + ", "
                  f"data {self.data_path}", flush=True)

    def _note(self, line: str) -> None:
        """A change to what the config asked for: one line on rank 0 (stderr; not --quiet)."""
        if self.rank0 and not self.quiet:
            print(f"mpifc train: note: {line}", file=sys.stderr, flush=True)

    # --- metrics ---
    def log(self, record: dict) -> None:
        if self.rank0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _sum_over_dp(self, values) -> np.ndarray:
        """Sum per-rank values over the data group (one allreduce for all of them)."""
        with trace.phase("metrics"):
            return self.grid.dp_comm.allreduce(np.asarray(values, dtype=np.float64))

    # --- one step ---
    def train_step(self, batch) -> tuple[float, int]:
        """Forward, backward, gradient sync, clip, update. Returns (loss sum, correct) here.

        ``train.accumulate`` = K: the rank's rows run as K micro-batches
        (:func:`~mpifc.data.loader.micro_batches`); the first K - 1 backwards run under
        ``dp.no_sync()`` (no message), the K-th allreduces the summed buckets once.
        """
        from mpifc.data.loader import micro_batches
        from mpifc.parallel import clip_grad_norm_grid

        model = self.model
        parts = micro_batches(batch, self.cfg["train"].get("accumulate", 1))
        loss_sum, correct = 0.0, 0
        self.dp.zero_grad()
        for i, mb in enumerate(parts):
            m, last = int(mb.y.shape[0]), i == len(parts) - 1
            with trace.span("forward"):      # spans: the trace shows compute beside the calls
                logits = model.forward(mb.x)
                loss_sum += float(model.loss.forward(logits, mb.y)) * m
                correct += int(model.loss.correct())
            with trace.span("backward"):
                # The loss is a mean over the m rows here and data parallel averages over
                # the dp ranks; scaling by dp * m / B makes the sum over micro-batches and
                # ranks the mean over the global batch (exact for uneven splits; a part
                # with no rows contributes zeros).
                dlogits = model.loss.backward(self.grid.dp * m / batch.global_size)
                if last:
                    self.dp.backward(dlogits)
                    self.dp.synchronize()
                else:
                    with self.dp.no_sync():
                        self.dp.backward(dlogits)
        self.exposed_s += self.dp.timings["post"] + self.dp.timings["wait"]
        with trace.span("update"):
            clip = self.cfg["optim"]["clip_norm"]
            if clip:
                clip_grad_norm_grid(model.parameters(), clip, self.grid)
            self.opt.step()
            if self.sched is not None and self.sched[0] == "step":
                self.sched[1].step()
        return loss_sum, correct

    def evaluate(self, loader=None) -> dict:
        """Loss and accuracy over a whole split (default: test), completed over dp."""
        loader = loader or self.test_loader
        self.model.eval()
        tot = np.zeros(3)
        loader.set_position(0, 0)
        for batch in loader:
            b = int(batch.y.shape[0])
            logits = self.model.forward(batch.x)
            loss = float(self.model.loss.forward(logits, batch.y))
            tot += (loss * b, int(self.model.loss.correct()), b)
        self.model.train()
        s = self._sum_over_dp(tot)
        return {"test_loss": s[0] / s[2], "test_acc": s[1] / s[2]}

    def run(self) -> dict:
        """Train from the current position to ``train.epochs`` (or ``train.max_steps``)."""
        t = self.cfg["train"]
        steps = self.loader.steps_per_epoch
        last: dict = {}
        t_start = time.perf_counter()
        stop = False
        bar = Progress(self.progress, steps, t["epochs"])
        while not stop and self.loader.position[0] < t["epochs"]:
            epoch, first = self.loader.position
            bar.start_epoch(epoch, first)
            tot = np.zeros(3)
            n_events, self.exposed_s = len(trace.TRACER), 0.0
            t0 = time.perf_counter()
            for batch in self.loader:
                with trace.step(self.step + 1, batch.global_size):   # replay splits on these
                    loss_sum, correct = self.train_step(batch)
                    finite = _agree_finite(self.grid.world, loss_sum)
                b = int(batch.y.shape[0])
                if not finite:
                    self._non_finite(batch)
                tot += (loss_sum, correct, b)
                self.step += 1
                watchdog.beat(self.step)          # train.watchdog_s: progress (no communication)
                bar.update(loss_sum / max(b, 1), b * self.grid.dp)
                if t["log_every"] and self.step % t["log_every"] == 0:
                    s = self._sum_over_dp([loss_sum, correct, b])
                    self.log({"step": self.step, "epoch": epoch + 1, "loss": s[0] / s[2],
                              "acc": s[1] / s[2], "lr": self.opt.lr})
                if t["max_steps"] and self.step >= t["max_steps"]:
                    stop = True
                    break
            bar.close()
            dt = time.perf_counter() - t0
            # seconds blocked in communication: blocking calls + posting/waiting for iallreduce
            s = self._sum_over_dp([*tot, trace.TRACER.blocked_seconds(n_events) + self.exposed_s])
            rec = {"epoch": epoch + 1, "step": self.step, "loss": s[0] / max(s[2], 1),
                   "acc": s[1] / max(s[2], 1), "samples_per_s": s[2] / dt, "epoch_s": dt,
                   "comm_s": s[3] / self.grid.dp, "lr": self.opt.lr}
            finished = self.loader.position[1] == 0      # the epoch ran to its end
            if finished:
                with trace.span("evaluate"):
                    rec.update(self.evaluate())
                    if self.val_loader is not None:          # issue 18 item 3: validation
                        v = self.evaluate(self.val_loader)
                        rec.update(val_loss=v["test_loss"], val_acc=v["test_acc"])
                watchdog.beat(self.step)
                watched = watched_loss(rec)    # (name, value): val_loss, else test_loss
                if self.sched is not None and self.sched[0] == "epoch":
                    self.sched[1].step()
                elif self.sched is not None and self.sched[0] == "metric":
                    self.sched[1].step(watched[1])
                if self.early.step(*watched, epoch + 1):    # reduced metric: all ranks agree
                    stop = rec["stopped_early"] = True
            self.log(rec)
            if self.rank0 and not self.quiet:
                test = (f"  test_loss {rec['test_loss']:.4f}  test_acc {rec['test_acc']:.4f}"
                        if finished else "  (stopped mid-epoch)")
                if "val_loss" in rec:
                    test += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_acc']:.4f}"
                print(f"epoch {epoch + 1:>3}/{t['epochs']}  loss {rec['loss']:.4f}  "
                      f"acc {rec['acc']:.4f}{test}  {rec['samples_per_s']:.0f} samples/s  "
                      f"comm {rec['comm_s']:.2f}s of {dt:.2f}s", flush=True)
            last = rec
            every = t["checkpoint_every"]
            if every and (stop or (finished and (epoch + 1) % every == 0)
                          or self.loader.position[0] >= t["epochs"]):
                with trace.span("checkpoint"):
                    self.save(rec if finished else None)
            if rec.get("stopped_early") and self.rank0:    # one line, even with --quiet
                print(f"mpifc train: {self.early.reason()}", flush=True)
        last["total_s"] = time.perf_counter() - t_start
        return last

    def _non_finite(self, batch) -> None:
        """Raise for a non-finite loss: bad input data if any rank's batch had it, else the lr.

        Collective (every rank gets here together, after the finite check agreed).
        """
        from mpifc.backend import get_array_module, to_host
        from mpifc.data import DatasetError

        x = batch.x
        if isinstance(x, tuple):     # text: integer token ids (checked by the loader)
            x = np.zeros((int(batch.y.shape[0]), 1), dtype=np.float32)
        xp = get_array_module(x)
        ok = to_host(xp.isfinite(x.reshape(x.shape[0], int(np.prod(x.shape[1:])))).all(axis=1))
        bad = None
        if not ok.all():      # the sample index in the file, not the row of the batch
            rows = self.loader.sample_rows(
                self.loader.plan.local_indices(batch.epoch, batch.step, self.grid.dp_rank))
            bad = int(rows[np.flatnonzero(~ok)[0]])
        where = self.comm.allgather_obj(bad)
        ranks = [r for r, w in enumerate(where) if w is not None]
        if ranks:
            raise DatasetError(f"non-finite input at step {self.step} (epoch {batch.epoch + 1}, "
                               f"batch {batch.step}): row {where[ranks[0]]} of split 'train' of "
                               f"{self.data_path} holds NaN or Inf after normalisation (rank "
                               f"{ranks[0]}); fix the dataset, lowering optim.lr will not help")
        raise TrainingError(f"non-finite loss at step {self.step} (epoch {batch.epoch + 1}, "
                            f"batch {batch.step + 1}); the input was finite: lower optim.lr or "
                            "set optim.clip_norm")

    # --- checkpoints ---
    def save(self, metrics: dict | None = None) -> str:
        """Write a checkpoint (collective); with ``metrics`` of a finished epoch, keep the best.

        ``train.keep_best`` names the metric ("test_acc": higher is better, "test_loss":
        lower is better, "" off). A checkpoint that improves it is also published as
        ``checkpoints/best.h5`` (a hard link, or a copy), which pruning never deletes.
        """
        from mpifc.checkpoint import save
        from mpifc.checkpoint.atomic import publish_link

        t = self.cfg["train"]
        key = t["keep_best"]
        best = self.best
        if key and metrics is not None and key in metrics and math.isfinite(metrics[key]):
            value = float(metrics[key])
            if best is None or best.get("metric") != key or (
                    value > best["value"] if key.endswith("acc") else value < best["value"]):
                best = {"metric": key, "value": value, "step": self.step}
        extra = {"step": self.step}
        if best is not None:
            extra["best"] = best
        if self.sched is not None:
            extra["schedule"] = schedule_state(self.sched[1])
        extra["early_stop"] = self.early.state_dict()      # issue 18 item 3
        path = save(self.ckpt_dir, self.model, self.opt, self.grid, step=self.step,
                    epoch=self.loader.position[0], data_position=self.loader.state_dict(),
                    rng_states=generators(self.model), config=to_toml(self.cfg),
                    keep_last=t["keep_last"], extra=extra,
                    sign_key=t.get("sign_key") or None, key=self.ckpt_key)
        self.saved = path
        if best is not self.best:
            self.best = best
            if self.rank0:                 # only rank 0 touches files; a failure is a note
                try:
                    publish_link(path, os.path.join(self.ckpt_dir, BEST_NAME))
                except OSError as e:
                    print(f"mpifc train: could not update {BEST_NAME}: {e}", file=sys.stderr,
                          flush=True)
        return path

    def resume(self, path: str | None = None) -> dict | None:
        """Continue from ``path`` (a checkpoint or directory; default: this run's latest).

        From a directory, the newest checkpoint whose digest verifies is used: a newer
        one that does not (a cut-off copy, a 0-byte file) is renamed ``*.damaged``,
        and rank 0 says which one was used and why the newer was skipped.
        Any dp x tp layout can load any checkpoint; the RNG states come back only
        when the layout is the saved one. Returns the checkpoint header, or None when
        there is nothing to resume from.
        """
        from mpifc.checkpoint import CheckpointError, load, newest_valid, set_rng_state

        path, skipped = path or self.ckpt_dir, []
        own = os.path.realpath(path) == os.path.realpath(self.ckpt_dir)
        # rank 0 decides for all: a directory only some ranks see must not split them
        got = None
        if self.rank0:
            is_dir, found = os.path.isdir(path), None
            if is_dir:
                found, bad = newest_valid(path)
                for b, why in bad:
                    if own:          # this run's directory only: never listed, pruned, resumed
                        try:
                            os.replace(b, b + ".damaged")
                            why += f"; renamed to {os.path.basename(b)}.damaged"
                        except OSError:
                            pass
                    print(f"mpifc train: skipped {b}: {why}", file=sys.stderr, flush=True)
                skipped = [b for b, _ in bad]
            got = (is_dir, found, skipped)
        is_dir, found, skipped = self.comm.bcast_obj(got)
        if is_dir:
            if found is None:
                if skipped:
                    raise CheckpointError(f"no checkpoint in {path} verifies (skipped "
                                          f"{', '.join(map(os.path.basename, skipped))}); "
                                          "start over with --overwrite")
                return None
            path = found
        info = load(path, self.model, self.opt, self.grid,
                    verify_key=self.cfg["train"].get("verify_key") or None, key=self.ckpt_key)
        self.loader.load_state_dict(info["data_position"])
        extra = info.get("extra") or {}
        self.step = int(extra.get("step", info["step"]))
        # best.h5 lives in the checkpoint's directory: another run's best is not this one's
        own = own or os.path.dirname(os.path.realpath(info["path"])) == os.path.realpath(
            self.ckpt_dir)
        self.best = extra.get("best") if own else None
        if self.sched is not None and "schedule" in extra:
            self.sched[1].load_state_dict(extra["schedule"])
        if info.get("rng_states"):
            for name, gen in generators(self.model).items():
                if name in info["rng_states"]:
                    set_rng_state(gen, info["rng_states"][name])
        if self.rank0 and (not self.quiet or skipped):
            lay = info["layout"]
            newer = (f"; the newer {', '.join(map(os.path.basename, skipped))} did not verify"
                     if skipped else "")
            print(f"resumed from {info['path']} (step {self.step}, saved as dp={lay['dp']} x "
                  f"tp={lay['tp']}){newer}", flush=True)
        if "early_stop" in extra:                          # issue 18 item 3
            self.early.load_state_dict(extra["early_stop"])
            note = self.early.resumed()
            if note and self.rank0:
                print(f"mpifc train: {note}", flush=True)
        self._resume_lr(info)
        return info

    def _resume_lr(self, info: dict) -> None:
        """The lr to continue with: the checkpoint's, unless this run's optim.lr differs
        from the one the checkpoint's run was configured with -- then this run's wins.

        Step and cosine schedules give the lr of their position from this run's settings
        (the same as the checkpoint's lr when nothing changed); plateau and no schedule
        start from the new optim.lr.
        """
        import tomllib

        from mpifc.config import DEFAULTS

        new, old, stored = self.cfg["optim"]["lr"], None, info.get("config")
        try:       # the lr the checkpoint's run was configured with (None: not known)
            old = float(tomllib.loads(stored).get("optim", {}).get("lr", DEFAULTS["optim"]["lr"]))
        except (tomllib.TOMLDecodeError, TypeError, ValueError, AttributeError):
            pass
        changed = old is not None and old != new
        sched = self.sched[1] if self.sched is not None else None
        if sched is not None and hasattr(sched, "current_lr"):
            self.opt.lr = sched.current_lr()
        elif changed:
            self.opt.lr = new
        if changed and self.rank0 and not self.quiet:
            now = "" if self.opt.lr == new else f"; lr at this point of the schedule {self.opt.lr:.6g}"
            print(f"optim.lr: {new:g} (from this run's config; the checkpoint had {old:g}){now}",
                  flush=True)

    def nothing_to_do(self) -> str | None:
        """Why ``run()`` would not train a step (the run is past train.epochs/max_steps)."""
        t = self.cfg["train"]
        epoch = self.loader.position[0]
        if self.early.still_stopped():                     # issue 18 item 3
            return f"the run in {self.out} {self.early.reason()}"
        if epoch >= t["epochs"]:
            return (f"the run in {self.out} is already at epoch {epoch} >= train.epochs = "
                    f"{t['epochs']}")
        if t["max_steps"] and self.step >= t["max_steps"]:
            return (f"the run in {self.out} is already at step {self.step} >= train.max_steps = "
                    f"{t['max_steps']}")
        return None

    def finish(self, last: dict) -> dict:
        """Write the trace (if enabled) and print where everything went."""
        from mpifc.rundir import remove_stale_traces

        paths = {"metrics": self.metrics_path, "checkpoints": self.ckpt_dir}
        if self.cfg["train"]["trace"]:
            trace_dir = os.path.join(self.out, "trace")
            if self.rank0:       # files of ranks this job does not have: an earlier, larger job
                remove_stale_traces(trace_dir, self.comm.size)
            got = write_trace(self.comm, trace_dir)
            if self.rank0 and got:
                paths.update({f"trace_{k}": v for k, v in got.items()})
        if self.rank0:
            from mpifc.checkpoint import latest_checkpoint

            paths["checkpoint"] = (os.path.join(self.ckpt_dir, os.path.basename(self.saved))
                                   if self.saved else latest_checkpoint(self.ckpt_dir))
            acc = last.get("test_acc")          # printed even with --quiet: where things went
            print(f"done in {last.get('total_s', 0):.1f} s"
                  + (f": test accuracy {acc:.4f}" if acc is not None else ""))
            print(f"metrics    {self.metrics_path}")
            print(f"checkpoint {paths['checkpoint']}")
            if self.best is not None:
                paths["best"] = os.path.join(self.ckpt_dir, BEST_NAME)
                print(f"best       {paths['best']} ({self.best['metric']} "
                      f"{self.best['value']:.4f} at step {self.best['step']})")
            if "trace_chrome" in paths:
                print(f"trace      {paths['trace_chrome']} (Perfetto / chrome://tracing); "
                      f"summary {paths.get('trace_summary', '')}", flush=True)
        return paths


@job_in_progress()      # a rank that exits mid-job ends the job, never leaves it hanging
def train(cfg: dict, *, quiet: bool = False, resume: str | bool | None = None,
          out: str | None = None, overwrite: bool = False, progress: str = "auto") -> dict:
    """Train ``cfg`` on the world communicator; returns the last epoch's metrics on rank 0.

    The run directory (``out``, default ``train.out``) holds one run: it is locked for
    the job (:mod:`mpifc.rundir`); a new run into a directory holding another run's
    outputs is refused unless ``resume`` (continue it) or ``overwrite`` (delete its
    outputs first). Resuming a run that is already past ``train.epochs`` /
    ``train.max_steps`` says so and returns ``{"nothing_to_do": reason}`` without
    touching the outputs.
    """
    from mpifc.rundir import claim

    trace.reset()
    trace.enable()
    comm = world()
    sync_clock(comm)
    out = out or cfg["train"]["out"].format(name=cfg["name"])
    run = claim(comm, out, resume=resume, overwrite=overwrite)
    try:
        if comm.rank == 0:
            for note in run.notes:
                print(f"mpifc train: {note}", file=sys.stderr, flush=True)
        tr = Trainer(cfg, quiet=quiet, comm=comm, out=out, progress=progress)
        if resume:
            info = tr.resume(resume if isinstance(resume, str) else None)
            if info is None and tr.rank0 and not quiet:
                print(f"nothing to resume in {tr.ckpt_dir}; starting fresh", flush=True)
            done = tr.nothing_to_do()
            if done:
                if tr.rank0:
                    knob = ("train.early_stop (or set it to 0)" if tr.early.still_stopped()
                            else "train.epochs or train.max_steps")
                    print(f"mpifc train: {done}: nothing to do (raise {knob} to train "
                          "further); outputs left as they were", flush=True)
                return {"nothing_to_do": done}
        with watchdog.running(cfg["train"]["watchdog_s"], comm):
            last = tr.run()
        last["paths"] = tr.finish(last)
        return last
    finally:
        run.release()
