"""The object-level trainer: any mpifc model, a loader, an optimizer and a loss on a grid.

    import mpifc
    from mpifc import nn, optim
    from mpifc.comm import Grid, world

    grid = Grid(world(), tp=2)                      # dp = job size / 2
    model = nn.Sequential(...)                      # serial and sharded layers, built on grid
    opt = optim.Adam(model.parameters(), lr=2e-3)
    last = mpifc.fit(model, "runs/data/digits.h5", optimizer=opt, loss=..., grid=grid,
                     epochs=3, batch_size=64, out="runs/mine")

:func:`fit` is the Python API; ``mpifc train`` (:mod:`mpifc.train`) builds the same
objects from a config and runs the same :class:`Trainer` through the same
:func:`run_job`, so the two cannot drift apart. One step, on every rank of a dp x tp
grid:

    batch     the loader gives this dp rank its rows of the global batch (tp ranks: same rows)
    forward   sharded layers talk over tp; the loss (class-parallel when the logits are
              sharded) allreduces over tp
    backward  gradients; data-parallel buckets allreduce over dp, overlapped with backward
    update    clip (norm completed over the grid), optimizer on the local shards

Rank 0 writes ``<out>/metrics.jsonl`` (one record per epoch, and one per
``log_every`` steps), checkpoints go to ``<out>/checkpoints`` (the best by
``keep_best`` also as ``best.h5``), the trace to ``<out>/trace``. :func:`run_job`
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
from dataclasses import dataclass, fields

import numpy as np

from mpifc.comm import job_in_progress, trace, watchdog
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.errors import UserError
from mpifc.optim.early_stop import EarlyStopping, watched_loss
from mpifc.stepmetrics import StepMetrics, StepRecord


BEST_NAME = "best.h5"     # in the checkpoint directory: the best checkpoint by keep_best


class TrainingError(UserError, RuntimeError, all_ranks=True):
    """Training cannot go on (non-finite loss, a dataset that does not fit the model)."""


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What the loop does, besides the objects it is given. Each field is the config key
    ``train.<field>`` (``clip_norm``: ``optim.clip_norm``), checked by that key's row of
    :data:`mpifc.config.SCHEMA`: one set of rules for ``mpifc train`` and :func:`fit`."""

    epochs: int = 1
    max_steps: int = 0            # stop (and checkpoint) after N steps; 0 = no limit
    accumulate: int = 1           # micro-batches per optimizer step
    clip_norm: float = 0.0        # clip the global gradient norm; 0 = off
    log_every: int = 0            # also log every N steps
    checkpoint_every: int = 1     # epochs between checkpoints; 0 = none
    keep_last: int = 3            # checkpoints kept; 0 = all
    keep_best: str = "auto"       # metric of checkpoints/best.h5: auto (val_acc with a
                                  # validation set, else test_acc) | test_acc | test_loss |
                                  # val_acc | val_loss | "" off
    early_stop: int = 0           # stop after N epochs without a lower watched loss; 0 = off
    trace: bool = True            # write the per-rank communication trace
    watchdog_s: float = 0.0       # seconds a rank may take for one step; 0 = off
    sign_key: str = ""            # Ed25519 private key file: sign every checkpoint
    verify_key: str = ""          # public key file: resume only checkpoints it signed

    @staticmethod
    def key(name: str) -> str:
        """The config key of a field."""
        return "optim.clip_norm" if name == "clip_norm" else f"train.{name}"

    @classmethod
    def from_config(cls, cfg: dict) -> "Settings":
        """The settings of a (validated) config."""
        t = cfg["train"]
        return cls(**{f.name: cfg["optim"]["clip_norm"] if f.name == "clip_norm"
                      else t.get(f.name, f.default) for f in fields(cls)})

    @classmethod
    def checked(cls, where: str = "fit", **given) -> "Settings":
        """Settings from keyword arguments, each checked by its config key's row; a bad
        value raises ConfigError naming the argument (``fit: epochs must be ...``)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        from mpifc.config import SCHEMA, ConfigError

        if unknown:
            raise ConfigError(f"{where}: unknown argument(s) {unknown}; known: {sorted(names)}")
        for name, value in given.items():
            if value is None and name in ("sign_key", "verify_key"):
                given[name] = ""
                continue
            check_value(where, name, value, SCHEMA[cls.key(name)])
            given[name] = SCHEMA[cls.key(name)].cast(value)
        return cls(**given)


def check_value(where: str, name: str, value, row) -> None:
    """Raise ConfigError unless ``value`` passes the config row ``row`` (a SCHEMA Key)."""
    from mpifc.config import ConfigError

    if not row.ok(value):
        raise ConfigError(f"{where}: {name} must be {row.want}, got {value!r}")


# ---------------------------------------------------------------------- set-up helpers
def _host_kernels() -> str:
    """The host GEMMs (mpifc.nn.hostblas) and kernels (mpifc.nn.hostjit) as the start
    line names them; a cold Numba cache is said, since the first epoch is slower by
    the compile."""
    from mpifc.nn import hostblas, hostjit

    kind = hostjit.active()
    cold = kind == "numba" and not hostjit.cached()
    return (f"{hostblas.active()} GEMMs, {kind} kernels"
            + (" (compiling them: ~5 s, first run only)" if cold else ""))


def setup_threads(comm) -> int:
    """One BLAS pool per rank sized to the cores it owns (a user's OMP_NUM_THREADS wins)."""
    from mpifc.threads import apply_blas_threads

    with trace.disabled():
        node = comm.split_shared()
    return apply_blas_threads(node.size)


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

    def update(self, loss: float | None, samples: int) -> None:
        """One step done; ``loss``: the last loss read back (None: none yet)."""
        self.step += 1
        if self.bar is not None:
            if loss is not None:
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
                  f"{self.steps}  loss {'-' if loss is None else format(loss, '.4f')}{rate}{eta}",
                  file=sys.stderr, flush=True)

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


def _as_f64(v):
    """A loss value in float64: a float on the host, a 0-d float64 array on a device."""
    from mpifc.backend import is_device_array

    return v.astype(np.float64) if is_device_array(v) else float(v)


def _correct(loss):
    """Rows right: an int on the host, a 0-d array on a device (a loss's ``correct_array``,
    when it has one, counts without reading the device)."""
    from mpifc.backend import is_device_array

    arr = getattr(loss, "correct_array", None)
    if arr is None:
        return int(loss.correct())
    c = arr()
    return c if is_device_array(c) else int(c)


def _agree_finite(comm, value: float) -> bool:
    """True on every rank when ``value`` is finite on every rank (one allreduce)."""
    with trace.phase("check.finite"):
        bad = comm.allreduce(np.array([0.0 if math.isfinite(value) else 1.0]), op="max")
    return not bad[0]


# ---------------------------------------------------------------------- loss and schedule
def training_loss(loss, model):
    """``loss`` with the trainer's interface: ``forward(logits, y)`` -> mean over the local
    rows, ``backward(scale)`` -> dlogits, ``correct()`` -> rows right.

    None: the model's own (``model.loss``: a :func:`~mpifc.models.build_model` Net has
    one). A loss with ``correct()`` (:class:`~mpifc.parallel.ParallelSoftmaxCrossEntropy`
    on class-split logits, a Net's loss) is used as it is; a serial
    :class:`~mpifc.nn.SoftmaxCrossEntropy` on whole logits is wrapped (accuracy, and
    a rank with no rows in an uneven last batch).
    """
    from mpifc import nn
    from mpifc.models import LocalLoss

    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise TypeError("fit: pass loss= (e.g. mpifc.nn.SoftmaxCrossEntropy() on whole "
                            "logits, mpifc.parallel.ParallelSoftmaxCrossEntropy on class-split "
                            "logits); the model has no .loss")
    if isinstance(loss, nn.SoftmaxCrossEntropy):
        return LocalLoss(None, ce=loss)
    if not all(callable(getattr(loss, m, None)) for m in ("forward", "backward", "correct")):
        raise TypeError(f"fit: loss {type(loss).__name__} needs forward(logits, y), "
                        "backward(scale) and correct()")
    return loss


def schedule_when(schedule) -> str:
    """When a schedule steps: "step" (CosineWarmup), "epoch" (StepLR) or "metric"
    (ReduceLROnPlateau, on the test loss, or the train loss without a test split)."""
    from mpifc import optim

    for cls, when in ((optim.CosineWarmup, "step"), (optim.StepLR, "epoch"),
                      (optim.ReduceLROnPlateau, "metric")):
        if isinstance(schedule, cls):
            return when
    when = getattr(schedule, "when", None)
    if when in ("step", "epoch", "metric"):
        return when
    raise TypeError(f"schedule {type(schedule).__name__}: not an mpifc.optim schedule; give "
                    "it an attribute when = 'step' | 'epoch' | 'metric'")


def check_model_fits_grid(model, grid, where: str = "fit") -> None:
    """Raise GridError on every rank unless the model's shardings fit ``grid`` (a model
    built on another tensor group would average shards over dp); one allgather."""
    from mpifc.checkpoint.entries import collect, local_problems
    from mpifc.comm import GridError

    try:
        problems = local_problems(collect(model, None, grid))
    except ValueError as e:
        problems = [str(e)]
    everyone = grid.world.allgather_obj(problems[:1])
    bad = [(r, p[0]) for r, p in enumerate(everyone) if p]
    if bad:
        raise GridError(f"{where}: the model does not fit the grid dp={grid.dp} x tp={grid.tp} "
                        f"(rank {bad[0][0]}: {bad[0][1]}); build its sharded layers on "
                        "grid.tp_comm of the grid you pass")


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Trains ``model`` on ``loader`` with ``optimizer`` on ``grid`` (every rank calls it).

    ``run()`` trains; ``save()``/``resume()`` write and read checkpoints;
    ``evaluate()`` returns test loss and accuracy. :class:`mpifc.train.Trainer` is this
    class built from a config.

    Parameters
    ----------
    model : Module (serial layers, sharded layers, a Sequential of both) built on ``grid``
    loader : :class:`~mpifc.data.DistributedLoader` of the train split on ``grid.dp_comm``
    optimizer : an :mod:`mpifc.optim` optimizer over ``model.parameters()``
    grid : :class:`~mpifc.comm.Grid`
    loss : see :func:`training_loss` (None: ``model.loss``)
    test_loader : loader of the split :meth:`evaluate` reports on after each epoch, or None
    val_loader : loader of held-out train rows, evaluated after each epoch as val_loss /
        val_acc, or None; the plateau schedule and early stop watch its loss when given
    schedule : an :mod:`mpifc.optim` schedule, a ("step" | "epoch" | "metric", schedule)
        pair, or None
    settings : :class:`Settings`
    out : run directory (metrics.jsonl, checkpoints/, trace/)
    title : what rank 0's lines start with ("mpifc train", "mpifc.fit"); ``name`` follows
        it in the first line
    config : TOML text stored in checkpoints (``mpifc eval`` rebuilds the model from it)
    ckpt_key : :class:`~mpifc.security.crypt.DataKey`: checkpoints encrypted at rest
    bucket_mb, overlap : :class:`~mpifc.parallel.DataParallel`'s
    threads : BLAS threads already set per rank (None: set them here)
    device : the :class:`~mpifc.device.Device` the model lives on (named in the first
        line); None: the host, or what the model's arrays say
    """

    def __init__(self, model, loader, *, optimizer, grid, loss=None, test_loader=None,
                 val_loader=None, schedule=None, settings: Settings = Settings(), out: str = "runs/fit",
                 title: str = "mpifc.fit", name: str = "", quiet: bool = False,
                 progress: str = "auto", config: str | None = None, ckpt_key=None,
                 bucket_mb: float = 25.0, overlap: bool = True, threads: int | None = None,
                 device=None):
        from mpifc.parallel import DataParallel

        self.comm = grid.world
        self.grid, self.model, self.loader, self.test_loader = grid, model, loader, test_loader
        self.val_loader = val_loader
        self.early = EarlyStopping(settings.early_stop)     # train.early_stop on the watched loss
        # the best checkpoint is chosen on held-out train rows when there are some, so the
        # test split stays out of model selection
        self.keep_best = (("val_acc" if val_loader is not None else "test_acc")
                          if settings.keep_best == "auto" else settings.keep_best)
        self.settings, self.title, self.quiet = settings, title, quiet
        self.rank0 = self.comm.rank == 0
        self.progress = progress_mode(progress, self.rank0 and not quiet)
        self.threads = setup_threads(self.comm) if threads is None else threads
        self.out = out
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if self.rank0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.config, self.ckpt_key = config, ckpt_key
        self.data_path = loader.path
        self.loss = training_loss(loss, model)
        self.dp = DataParallel(model, grid.dp_comm, bucket_mb=bucket_mb, overlap=overlap)
        self.opt = optimizer
        self.base_lr = float(getattr(optimizer, "base_lr", optimizer.lr))   # resume compares it
        if schedule is not None and not isinstance(schedule, tuple):
            schedule = (schedule_when(schedule), schedule)
        self.sched = schedule
        self.step = 0
        self.saved: str | None = None      # the last checkpoint this session wrote
        self.best: dict | None = None      # {"metric", "value", "step"} of checkpoints/best.h5
        self.exposed_s = 0.0     # seconds posting and waiting for the overlapped dp allreduce
        if self.rank0 and not quiet:
            k = settings.accumulate
            print(f"{title}{' ' + name if name else ''}: {self.comm.size} rank(s) as "
                  f"dp={self.grid.dp} x tp={self.grid.tp}, "
                  + (f"{self.threads} BLAS thread(s) per rank, {_host_kernels()}, "
                     if device is None or device.kind == "cpu" else f"CuPy on {device} (rank 0), ")
                  + f"{self.loader.steps_per_epoch} steps/epoch of "
                  f"{self.loader.plan.batch_size} samples"
                  + (f" in {k} micro-batches" if k > 1 else "") + ", "
                  f"data {self.data_path}", flush=True)

    def _note(self, line: str) -> None:
        """A change to what the config asked for: one line on rank 0 (stderr; not --quiet)."""
        if self.rank0 and not self.quiet:
            print(f"{self.title}: note: {line}", file=sys.stderr, flush=True)

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
    def train_step(self, batch):
        """Forward, backward, gradient sync, clip, update. Returns (loss sum, correct) of
        this rank's rows where the model lives: Python numbers on the host, 0-d arrays on a
        device (``float()`` reads one back; :meth:`run` reads them once per log line).

        ``train.accumulate`` = K: the rank's rows run as K micro-batches
        (:func:`~mpifc.data.loader.micro_batches`); the first K - 1 backwards run under
        ``dp.no_sync()`` (no message), the K-th allreduces the summed buckets once.
        """
        from mpifc.data.loader import micro_batches
        from mpifc.parallel import clip_grad_norm_grid

        model, loss = self.model, self.loss
        parts = micro_batches(batch, self.settings.accumulate)
        loss_sum, correct = 0.0, 0
        self.dp.zero_grad()
        for i, mb in enumerate(parts):
            m, last = int(mb.y.shape[0]), i == len(parts) - 1
            with trace.span("forward"):      # spans: the trace shows compute beside the calls
                logits = model.forward(mb.x)
                loss_sum = loss_sum + _as_f64(loss.forward(logits, mb.y)) * m
                correct = correct + _correct(loss)
            with trace.span("backward"):
                # The loss is a mean over the m rows here and data parallel averages over
                # the dp ranks; scaling by dp * m / B makes the sum over micro-batches and
                # ranks the mean over the global batch (exact for uneven splits; a part
                # with no rows contributes zeros).
                dlogits = loss.backward(self.grid.dp * m / batch.global_size)
                if last:
                    self.dp.backward(dlogits)
                    self.dp.synchronize()
                else:
                    with self.dp.no_sync():
                        self.dp.backward(dlogits)
        self.exposed_s += self.dp.timings["post"] + self.dp.timings["wait"]
        with trace.span("update"):
            clip = self.settings.clip_norm
            if clip:
                clip_grad_norm_grid(model.parameters(), clip, self.grid)
            self.opt.step()
            if self.sched is not None and self.sched[0] == "step":
                self.sched[1].step()
        return loss_sum, correct

    def evaluate(self, loader=None) -> dict:
        """Loss and accuracy over a whole split (default: test), completed over dp;
        {} without a test split."""
        loader = loader or self.test_loader
        if loader is None:
            return {}
        from mpifc.backend import get_array_module, to_host

        self.model.eval()
        params = self.model.parameters()
        # loss sum and correct where the model lives: one read back per split
        sums = get_array_module(params[0].data if params else None).zeros(2, dtype=np.float64)
        rows = 0
        loader.set_position(0, 0)
        for batch in loader:
            b = int(batch.y.shape[0])
            logits = self.model.forward(batch.x)
            loss = _as_f64(self.loss.forward(logits, batch.y))
            sums[0] += loss * b
            sums[1] += _correct(self.loss)
            rows += b
        self.model.train()
        s = self._sum_over_dp([*to_host(sums), rows])
        return {"test_loss": s[0] / s[2], "test_acc": s[1] / s[2]}

    def run(self) -> dict:
        """Train from the current position to ``epochs`` (or ``max_steps``)."""
        t = self.settings
        steps = self.loader.steps_per_epoch
        last: dict = {}
        t_start = time.perf_counter()
        stop = False
        bar = Progress(self.progress, steps, t.epochs)
        shown = None          # no loss read back yet (a device reads them once per window)
        while not stop and self.loader.position[0] < t.epochs:
            epoch, first = self.loader.position
            bar.start_epoch(epoch, first)
            tot = np.zeros(3)
            n_events, self.exposed_s = len(trace.TRACER), 0.0
            t0 = time.perf_counter()
            # per-step metrics stay where the model computes; read back once per window:
            # every step on the host, each log line and the epoch's end on a device
            window = StepMetrics(self._xp(), t.log_every or steps,
                                 every_step=self._xp() is np)
            for batch in self.loader:
                b = int(batch.y.shape[0])
                logs = bool(t.log_every) and (self.step + 1) % t.log_every == 0
                ends = batch.step + 1 == steps or bool(t.max_steps and self.step + 1 >= t.max_steps)
                vals = None
                with trace.step(self.step + 1, batch.global_size):   # replay splits on these
                    loss_sum, correct = self.train_step(batch)
                    window.add(loss_sum, correct, StepRecord(self.step, batch.epoch, batch.step, b))
                    if window.every_step or window.full or logs or ends:
                        vals, rows = self._read_window(window, batch)
                        tot += (vals[:, 0].sum(), vals[:, 1].sum(), rows)
                self.step += 1
                watchdog.beat(self.step)          # train.watchdog_s: progress (no communication)
                if vals is not None:       # the loss the progress display shows: the last read
                    shown = vals[-1, 0] / max(b, 1)
                bar.update(shown, b * self.grid.dp)
                if logs:
                    s = self._sum_over_dp([vals[-1, 0], vals[-1, 1], b])
                    self.log({"step": self.step, "epoch": epoch + 1, "loss": s[0] / s[2],
                              "acc": s[1] / s[2], "lr": self.opt.lr})
                if t.max_steps and self.step >= t.max_steps:
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
                    if self.val_loader is not None:
                        v = self.evaluate(self.val_loader)
                        rec.update(val_loss=v["test_loss"], val_acc=v["test_acc"])
                watchdog.beat(self.step)
                watched = watched_loss(rec)     # val_loss, else test_loss, else the train loss
                if self.sched is not None and self.sched[0] == "epoch":
                    self.sched[1].step()
                elif self.sched is not None and self.sched[0] == "metric":
                    self.sched[1].step(watched[1])
                if self.early.step(*watched, epoch + 1):    # reduced metric: all ranks agree
                    stop = rec["stopped_early"] = True
            self.log(rec)
            if self.rank0 and not self.quiet:
                test = (f"  test_loss {rec['test_loss']:.4f}  test_acc {rec['test_acc']:.4f}"
                        if "test_loss" in rec else "" if finished else "  (stopped mid-epoch)")
                if "val_loss" in rec:
                    test += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_acc']:.4f}"
                print(f"epoch {epoch + 1:>3}/{t.epochs}  loss {rec['loss']:.4f}  "
                      f"acc {rec['acc']:.4f}{test}  {rec['samples_per_s']:.0f} samples/s  "
                      f"comm {rec['comm_s']:.2f}s of {dt:.2f}s", flush=True)
            last = rec
            every = t.checkpoint_every
            if every and (stop or (finished and (epoch + 1) % every == 0)
                          or self.loader.position[0] >= t.epochs):
                with trace.span("checkpoint"):
                    self.save(rec if finished else None)
            if rec.get("stopped_early") and self.rank0:    # one line, even with --quiet
                print(f"{self.title}: {self.early.reason()}", flush=True)
        last["total_s"] = time.perf_counter() - t_start
        return last

    def _xp(self):
        """The array module the model computes with (numpy, or cupy on a device)."""
        from mpifc.backend import get_array_module

        params = self.model.parameters()
        return get_array_module(params[0].data) if params else np

    def _read_window(self, window: StepMetrics, batch) -> tuple[np.ndarray, int]:
        """The window's (loss sum, correct) per step on the host, and its rows; raises
        for a non-finite loss, naming the first step of the window that had one on any rank.

        Collective: one device-to-host copy, the finite check's allreduce (as per step on
        the host); on failure, an allreduce min of the first bad step over the ranks.
        """
        vals, steps = window.take()
        bad = np.flatnonzero(~np.isfinite(vals[:, 0]))
        if _agree_finite(self.grid.world, math.inf if bad.size else 0.0):
            return vals, sum(r.rows for r in steps)
        first = 0
        if len(steps) > 1:        # which step went bad first, on any rank
            mine = float(bad[0]) if bad.size else float(len(steps))
            first = int(self.grid.world.allreduce(np.array([mine]), op="min")[0])
        rec = steps[first]
        if (rec.epoch, rec.batch) != (batch.epoch, batch.step):
            # that step's batch again (get_batch is deterministic, augmentation included;
            # collective in scatter mode: every rank is here for the same step)
            batch = self.loader.get_batch(rec.epoch, rec.batch)
        self._non_finite(batch, rec.step)

    def _non_finite(self, batch, step: int | None = None) -> None:
        """Raise for a non-finite loss: bad input data if any rank's batch had it, else the lr.

        ``step``: steps completed before ``batch`` (default: :attr:`step`). Collective
        (every rank gets here together, after the finite check agreed).
        """
        step = self.step if step is None else step
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
            raise DatasetError(f"non-finite input at step {step} (epoch {batch.epoch + 1}, "
                               f"batch {batch.step}): row {where[ranks[0]]} of split 'train' of "
                               f"{self.data_path} holds NaN or Inf after normalisation (rank "
                               f"{ranks[0]}); fix the dataset, lowering optim.lr will not help")
        raise TrainingError(f"non-finite loss at step {step} (epoch {batch.epoch + 1}, "
                            f"batch {batch.step + 1}); the input was finite: lower optim.lr or "
                            "set optim.clip_norm")

    # --- checkpoints ---
    def save(self, metrics: dict | None = None) -> str:
        """Write a checkpoint (collective); with ``metrics`` of a finished epoch, keep the best.

        ``keep_best`` (``train.keep_best``) names the metric ("test_acc": higher is better, "test_loss":
        lower is better, "" off; "auto" is val_acc with a validation set, else test_acc). A checkpoint that improves it is also published as
        ``checkpoints/best.h5`` (a hard link, or a copy), which pruning never deletes.
        """
        from mpifc.checkpoint import save
        from mpifc.checkpoint.atomic import publish_link

        t = self.settings
        key = self.keep_best
        best = self.best
        if key and metrics is not None and key in metrics and math.isfinite(metrics[key]):
            value = float(metrics[key])
            if best is None or best.get("metric") != key or (
                    value > best["value"] if key.endswith("acc") else value < best["value"]):
                best = {"metric": key, "value": value, "step": self.step}
        extra = {"step": self.step, "base_lr": self.base_lr}
        if best is not None:
            extra["best"] = best
        if self.sched is not None:
            extra["schedule"] = self.sched[1].state_dict()     # its position
        extra["early_stop"] = self.early.state_dict()
        path = save(self.ckpt_dir, self.model, self.opt, self.grid, step=self.step,
                    epoch=self.loader.position[0], data_position=self.loader.state_dict(),
                    rng_states=generators(self.model), config=self.config,
                    keep_last=t.keep_last, extra=extra,
                    sign_key=t.sign_key or None, key=self.ckpt_key)
        self.saved = path
        if best is not self.best:
            self.best = best
            if self.rank0:                 # only rank 0 touches files; a failure is a note
                try:
                    publish_link(path, os.path.join(self.ckpt_dir, BEST_NAME))
                except OSError as e:
                    print(f"{self.title}: could not update {BEST_NAME}: {e}", file=sys.stderr,
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
                    print(f"{self.title}: skipped {b}: {why}", file=sys.stderr, flush=True)
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
                    verify_key=self.settings.verify_key or None, key=self.ckpt_key)
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
        if "early_stop" in extra:
            self.early.load_state_dict(extra["early_stop"])
            note = self.early.resumed()
            if note and self.rank0:
                print(f"{self.title}: {note}", flush=True)
        self._resume_lr(info)
        return info

    def _resume_lr(self, info: dict) -> None:
        """The lr to continue with: the checkpoint's, unless this run's optim.lr (the
        optimizer's ``base_lr``) differs from the one the checkpoint's run started with
        (its ``base_lr``; older checkpoints: their config's optim.lr) -- then this run's wins.

        Step and cosine schedules give the lr of their position from this run's settings
        (the same as the checkpoint's lr when nothing changed); plateau and no schedule
        start from the new optim.lr.
        """
        import tomllib

        from mpifc.config import DEFAULTS

        new, old, stored = self.base_lr, None, info.get("config")
        saved = (info.get("extra") or {}).get("base_lr")
        try:       # the lr the checkpoint's run was configured with (None: not known)
            old = (float(saved) if saved is not None else
                   float(tomllib.loads(stored).get("optim", {}).get("lr", DEFAULTS["optim"]["lr"])))
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
        t = self.settings
        epoch = self.loader.position[0]
        if self.early.still_stopped():
            return f"the run in {self.out} {self.early.reason()}"
        if epoch >= t.epochs:
            return (f"the run in {self.out} is already at epoch {epoch} >= train.epochs = "
                    f"{t.epochs}")
        if t.max_steps and self.step >= t.max_steps:
            return (f"the run in {self.out} is already at step {self.step} >= train.max_steps = "
                    f"{t.max_steps}")
        return None

    def finish(self, last: dict) -> dict:
        """Write the trace (if enabled) and print where everything went."""
        from mpifc.rundir import remove_stale_traces

        paths = {"metrics": self.metrics_path, "checkpoints": self.ckpt_dir}
        if self.settings.trace:
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


# ---------------------------------------------------------------------- one job
@job_in_progress()      # a rank that exits mid-job ends the job, never leaves it hanging
def run_job(build, comm, out: str, *, resume: str | bool | None = None,
            overwrite: bool = False, title: str = "mpifc.fit") -> dict:
    """Claim ``out``, build the :class:`Trainer` (``build()``), resume, train, finish.

    What ``mpifc train`` and :func:`fit` both run, on every rank of ``comm``. The run
    directory holds one run: it is locked for the job (:mod:`mpifc.rundir`); a new run
    into a directory holding another run's outputs is refused unless ``resume``
    (continue it: True, or a checkpoint path) or ``overwrite`` (delete its outputs
    first). Resuming a run that is already past its epochs / max_steps says so and
    returns ``{"nothing_to_do": reason}`` without touching the outputs. Returns the
    last epoch's metrics (with ``paths``: where the outputs went, on rank 0).
    """
    from mpifc.rundir import claim

    trace.reset()
    trace.enable()
    sync_clock(comm)
    run = claim(comm, out, resume=resume, overwrite=overwrite)
    try:
        if comm.rank == 0:
            for note in run.notes:
                print(f"{title}: {note}", file=sys.stderr, flush=True)
        tr = build()
        if resume:
            info = tr.resume(resume if isinstance(resume, str) else None)
            if info is None and tr.rank0 and not tr.quiet:
                print(f"nothing to resume in {tr.ckpt_dir}; starting fresh", flush=True)
            done = tr.nothing_to_do()
            if done:
                if tr.rank0:
                    knob = ("train.early_stop (or set it to 0)" if tr.early.still_stopped()
                            else "train.epochs or train.max_steps")
                    print(f"{title}: {done}: nothing to do (raise {knob} to train "
                          "further); outputs left as they were", flush=True)
                return {"nothing_to_do": done}
        with watchdog.running(tr.settings.watchdog_s, comm):
            last = tr.run()
        last["paths"] = tr.finish(last)
        return last
    finally:
        run.release()


def fit(model, train_data, *, optimizer, loss=None, grid=None, epochs: int = 1,
        batch_size: int = 64, seed: int = 0, test_data="test", schedule=None,
        eval_batch_size: int = 512, data_mode: str = "slice", validation_split: float = 0.0,
        augment=None, crop_pad: int = 4, bucket_mb: float = 25.0,
        overlap: bool = True, out: str = "runs/fit", resume: str | bool | None = None,
        overwrite: bool = False, quiet: bool = False, progress: str = "auto",
        **settings) -> dict:
    """Train ``model`` on ``train_data``, as ``mpifc train`` does (collective: every rank).

    Parameters
    ----------
    model : Module -- serial layers, sharded layers (built on ``grid.tp_comm``), a
        Sequential of both, or a :func:`~mpifc.models.build_model` Net
    train_data : path of an mpifc HDF5 dataset (its "train" split) or a
        :class:`~mpifc.data.DistributedLoader` on ``grid.dp_comm``
    optimizer : an :mod:`mpifc.optim` optimizer over ``model.parameters()``
    loss : :class:`~mpifc.nn.SoftmaxCrossEntropy` (whole logits),
        :class:`~mpifc.parallel.ParallelSoftmaxCrossEntropy` (class-split logits), or
        None for ``model.loss``
    grid : the :class:`~mpifc.comm.Grid` the model was built on (default: the model's,
        else the world's dp x tp with the tp its sharded parameters name)
    epochs, batch_size, seed, eval_batch_size : as ``train.epochs``, ``train.batch_size``
        (global, split over dp), ``seed`` (data order) and ``train.eval_batch_size``
    test_data : split of the train file evaluated after each epoch ("test"), another
        dataset path, a DistributedLoader, or None (no evaluation)
    schedule : an :mod:`mpifc.optim` schedule on ``optimizer`` (CosineWarmup steps per
        step, StepLR per epoch, ReduceLROnPlateau on the test loss) or None
    data_mode : "slice" | "scatter" (``data.mode``); bucket_mb, overlap: ``parallel.*``
    validation_split, augment, crop_pad : as ``data.validation_split`` (held-out train
        rows evaluated each epoch as val_loss / val_acc; the plateau schedule and
        ``early_stop`` watch val_loss), ``data.augment`` ("crop", "flip") and
        ``data.crop_pad``; they apply when ``train_data`` is a path (a loader you build
        takes ``rows=`` and ``augment=`` itself)
    out, resume, overwrite, quiet, progress : as ``mpifc train``'s ``--out``,
        ``--resume``, ``--overwrite``, ``--quiet``, ``--progress``
    **settings : max_steps, accumulate, clip_norm, log_every, checkpoint_every,
        keep_last, keep_best, early_stop, trace, watchdog_s, sign_key, verify_key
        (:class:`Settings`)

    Returns
    -------
    dict : the last epoch's record of metrics.jsonl (loss, acc, test_loss, test_acc,
    samples_per_s, ...) plus ``paths`` on rank 0; ``{"nothing_to_do": why}`` when a
    resumed run is already done. Bad arguments raise ConfigError naming the argument.
    """
    from mpifc.config import SCHEMA, ConfigError
    from mpifc.data import Augment, DistributedLoader, split_rows
    from mpifc.state import model_grid

    s = Settings.checked(epochs=epochs, **settings)
    augment = [] if augment is None else list(augment) if isinstance(augment, tuple) else augment
    for name, key, value in (("batch_size", "train.batch_size", batch_size),
                             ("eval_batch_size", "train.eval_batch_size", eval_batch_size),
                             ("seed", "seed", seed), ("data_mode", "data.mode", data_mode),
                             ("bucket_mb", "parallel.bucket_mb", bucket_mb),
                             ("overlap", "parallel.overlap", overlap),
                             ("validation_split", "data.validation_split", validation_split),
                             ("augment", "data.augment", augment),
                             ("crop_pad", "data.crop_pad", crop_pad)):
        check_value("fit", name, value, SCHEMA[key])
    aug = Augment(tuple(SCHEMA["data.augment"].cast(augment)), pad=crop_pad, seed=seed)
    if isinstance(train_data, DistributedLoader) and (validation_split or aug.active):
        raise ConfigError("fit: validation_split and augment apply to a dataset path; a "
                          "DistributedLoader takes rows= and augment= when you build it")
    progress_mode(progress, False)             # an unknown mode fails here, on every rank
    loss = training_loss(loss, model)          # mistakes in the objects fail before any I/O
    grid = grid or model_grid(model)
    check_model_fits_grid(model, grid)
    params = model.parameters()
    dtype = params[0].data.dtype if params else np.float32
    from mpifc.backend import get_array_module
    xp = get_array_module(params[0].data) if params else np   # batches where the model lives

    def loader(data, split, **kw):
        if isinstance(data, DistributedLoader):
            if data.comm.size != grid.dp:
                raise TrainingError(f"fit: the {data.split} loader runs on {data.comm.size} "
                                    f"rank(s) but the grid has dp={grid.dp}: build it on "
                                    "grid.dp_comm")
            return data
        return DistributedLoader(os.fspath(data), grid.dp_comm, split=split, seed=seed,
                                 mode=data_mode, dtype=dtype, cache=True, xp=xp, **kw)

    def build():
        frac, val = float(validation_split), None
        train = loader(train_data, "train", batch_size=batch_size,
                       **({"rows": lambda n: split_rows(n, frac)[0]} if frac else {}),
                       **({"augment": aug} if aug.active else {}))
        if frac:
            val = loader(train.path, "train", batch_size=eval_batch_size, shuffle=False,
                         rows=lambda n: split_rows(n, frac)[1])
        test = test_data
        if isinstance(test, str) and not test.endswith((".h5", ".hdf5")) and os.sep not in test:
            test = (train.path, test)                   # a split of the train file
        if test is not None:
            path, split = test if isinstance(test, tuple) else (test, "test")
            test = loader(path, split, batch_size=eval_batch_size, shuffle=False)
        return Trainer(model, train, optimizer=optimizer, grid=grid, loss=loss,
                       test_loader=test, val_loader=val, schedule=schedule, settings=s, out=out,
                       title="mpifc.fit", quiet=quiet, progress=progress,
                       bucket_mb=bucket_mb, overlap=overlap)

    return run_job(build, grid.world, out, resume=resume, overwrite=overwrite,
                   title="mpifc.fit")
