"""The trainer: a config in; a trained model, metrics, checkpoints and a trace out.

    mpiexec -n 2 mpifc train digits-cnn [--set parallel.tp=2] [--resume]

One step, on every rank of a dp x tp grid:

    batch     the loader gives this dp rank its rows of the global batch (tp ranks: same rows)
    forward   sharded layers talk over tp; the loss (class-parallel when the logits are
              sharded) allreduces over tp
    backward  gradients; data-parallel buckets allreduce over dp, overlapped with backward
    update    clip (norm completed over the grid), optimizer on the local shards

Rank 0 writes ``<out>/metrics.jsonl`` (one record per epoch, and one per
``train.log_every`` steps), checkpoints go to ``<out>/checkpoints``, the trace to
``<out>/trace``. A NaN or Inf loss stops training with a message naming the step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from mpifc.comm import Grid, trace, world
from mpifc.comm.collect import sync_clock, write_trace
from mpifc.config import to_toml


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a dataset that does not fit the model)."""


# ---------------------------------------------------------------------- set-up helpers
def setup_threads(comm) -> int:
    """One BLAS pool per rank sized to the cores it owns (a user's OMP_NUM_THREADS wins)."""
    from mpifc.threads import apply_blas_threads

    with trace.disabled():
        node = comm.split_shared()
    return apply_blas_threads(node.size)


def resolve_dataset(cfg: dict, comm) -> str:
    """Path of the HDF5 dataset; a named dataset is prepared once, by rank 0, if missing."""
    from mpifc.data import prepare

    name = cfg["data"]["dataset"]
    if name.endswith((".h5", ".hdf5")) or os.path.sep in name:
        if not os.path.exists(name):
            raise FileNotFoundError(f"dataset {name!r} not found; create it with "
                                    "`mpifc data prepare ...`")
        return name
    shape = tuple(cfg["model"]["input"])
    builders = {
        "digits": lambda out: prepare.prepare_digits(out),
        "synthetic-images": lambda out: prepare.prepare_synthetic(
            out, n_train=4096, n_test=1024, shape=shape, num_classes=10, seed=cfg["seed"]),
        "synthetic": lambda out: prepare.prepare_synthetic(
            out, n_train=8192, n_test=1024, shape=shape, num_classes=10, seed=cfg["seed"]),
    }
    if name not in builders:
        raise ValueError(f"data.dataset {name!r}: expected a .h5 path or one of {sorted(builders)}")
    tag = "-" + "x".join(map(str, shape)) if name.startswith("synthetic") else ""
    path = os.path.join(cfg["data"]["dir"], f"{name}{tag}.h5")
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
        raise RuntimeError(f"preparing dataset {name!r} failed on rank 0: {err}")
    return path


def build_optimizer(cfg: dict, params):
    from mpifc import optim

    o = cfg["optim"]
    if o["name"] == "sgd":
        return optim.SGD(params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                         weight_decay=o["weight_decay"])
    cls = optim.Adam if o["name"] == "adam" else optim.AdamW
    return cls(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
               weight_decay=o["weight_decay"])


def build_schedule(cfg: dict, opt, steps_per_epoch: int):
    """The LR schedule and when it steps: ("step" | "epoch" | "metric", schedule) or None."""
    from mpifc import optim

    s = cfg["schedule"]
    if s["name"] == "step":
        return "epoch", optim.StepLR(opt, step_size=s["step_size"], gamma=s["gamma"])
    if s["name"] == "cosine":
        total = cfg["train"]["epochs"] * steps_per_epoch
        return "step", optim.CosineWarmup(opt, warmup_steps=s["warmup_steps"], total_steps=total,
                                          min_lr=s["min_lr"])
    if s["name"] == "plateau":
        return "metric", optim.ReduceLROnPlateau(opt, mode="min", factor=s["factor"],
                                                 patience=s["patience"])
    return None


def schedule_state(sched) -> dict:
    """A schedule's counters (everything but its optimizer), JSON-able."""
    return {k: v for k, v in vars(sched).items() if k != "opt"}


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal and not --quiet; a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                            dynamic_ncols=True)

    def update(self, **post):
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


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

    def __init__(self, cfg: dict, *, quiet: bool = False, comm=None, out: str | None = None):
        from mpifc.data import DistributedLoader
        from mpifc.models import build_model
        from mpifc.parallel import DataParallel

        self.cfg = cfg
        self.comm = comm or world()
        self.quiet = quiet
        self.rank0 = self.comm.rank == 0
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
        self.loader = DistributedLoader(self.data_path, dc, split="train",
                                        batch_size=t["batch_size"], seed=cfg["seed"],
                                        mode=cfg["data"]["mode"], dtype=self.dtype, cache=True,
                                        key=self.data_key)
        self.test_loader = DistributedLoader(self.data_path, dc, split="test", shuffle=False,
                                             batch_size=t["eval_batch_size"], seed=cfg["seed"],
                                             mode=cfg["data"]["mode"], dtype=self.dtype,
                                             cache=True, key=self.data_key)
        self.model = build_model(cfg["model"], self.grid, seed=cfg["seed"], dtype=self.dtype)
        if self.loader.num_classes > self.model.num_classes:
            raise TrainingError(f"the dataset has {self.loader.num_classes} classes but the "
                                f"model's last layer has {self.model.num_classes} outputs")
        self.dp = DataParallel(self.model, dc, bucket_mb=p["bucket_mb"], overlap=p["overlap"])
        self.opt = build_optimizer(cfg, self.model.parameters())
        self.sched = build_schedule(cfg, self.opt, self.loader.steps_per_epoch)
        self.step = 0
        self.exposed_s = 0.0     # seconds posting and waiting for the overlapped dp allreduce
        if self.rank0 and not quiet:
            print(f"mpifc train {cfg['name']}: {self.comm.size} rank(s) as dp={self.grid.dp} x "
                  f"tp={self.grid.tp}, {self.threads} BLAS thread(s) per rank, "
                  f"{self.loader.steps_per_epoch} steps/epoch of {t['batch_size']} samples, "
                  f"data {self.data_path}", flush=True)

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
        """Forward, backward, gradient sync, clip, update. Returns (loss sum, correct) here."""
        from mpifc.parallel import clip_grad_norm_grid

        model, b = self.model, int(batch.y.shape[0])
        self.dp.zero_grad()
        logits = model.forward(batch.x)
        loss = float(model.loss.forward(logits, batch.y))
        correct = int(model.loss.correct())
        # The loss is a mean over this rank's b rows and data parallel averages over the
        # dp ranks; scaling by dp * b / B makes the result the mean over the global batch
        # (exact for uneven last batches, and a rank with no rows contributes zeros).
        dlogits = model.loss.backward(self.grid.dp * b / batch.global_size)
        self.dp.backward(dlogits)
        self.dp.synchronize()
        self.exposed_s += self.dp.timings["post"] + self.dp.timings["wait"]
        clip = self.cfg["optim"]["clip_norm"]
        if clip:
            clip_grad_norm_grid(model.parameters(), clip, self.grid)
        self.opt.step()
        if self.sched is not None and self.sched[0] == "step":
            self.sched[1].step()
        return loss * b, correct

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
        while not stop and self.loader.position[0] < t["epochs"]:
            epoch, first = self.loader.position
            bar = Progress(self.rank0 and not self.quiet and sys.stderr.isatty(), steps, first,
                           f"epoch {epoch + 1}/{t['epochs']}")
            tot = np.zeros(3)
            n_events, self.exposed_s = len(trace.TRACER), 0.0
            t0 = time.perf_counter()
            for batch in self.loader:
                loss_sum, correct = self.train_step(batch)
                b = int(batch.y.shape[0])
                if not _agree_finite(self.grid.world, loss_sum):
                    raise TrainingError(f"non-finite loss at step {self.step} (epoch {epoch + 1}, "
                                        f"batch {self.loader.position[1]}); lower optim.lr or "
                                        "set optim.clip_norm")
                tot += (loss_sum, correct, b)
                self.step += 1
                bar.update(loss=f"{loss_sum / max(b, 1):.3f}")
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
                rec.update(self.evaluate())
                if self.sched is not None and self.sched[0] == "epoch":
                    self.sched[1].step()
                elif self.sched is not None and self.sched[0] == "metric":
                    self.sched[1].step(rec["test_loss"])
            self.log(rec)
            if self.rank0 and not self.quiet:
                test = (f"  test_loss {rec['test_loss']:.4f}  test_acc {rec['test_acc']:.4f}"
                        if finished else "  (stopped mid-epoch)")
                print(f"epoch {epoch + 1:>3}/{t['epochs']}  loss {rec['loss']:.4f}  "
                      f"acc {rec['acc']:.4f}{test}  {rec['samples_per_s']:.0f} samples/s  "
                      f"comm {rec['comm_s']:.2f}s of {dt:.2f}s", flush=True)
            last = rec
            every = t["checkpoint_every"]
            if every and (stop or (finished and (epoch + 1) % every == 0)
                          or self.loader.position[0] >= t["epochs"]):
                self.save()
        last["total_s"] = time.perf_counter() - t_start
        return last

    # --- checkpoints ---
    def save(self) -> str:
        from mpifc.checkpoint import save

        extra = {"step": self.step}
        if self.sched is not None:
            extra["schedule"] = schedule_state(self.sched[1])
        return save(self.ckpt_dir, self.model, self.opt, self.grid, step=self.step,
                    epoch=self.loader.position[0], data_position=self.loader.state_dict(),
                    rng_states=generators(self.model), config=to_toml(self.cfg),
                    keep_last=self.cfg["train"]["keep_last"], extra=extra, key=self.ckpt_key)

    def resume(self, path: str | None = None) -> dict | None:
        """Continue from ``path`` (a checkpoint or directory; default: this run's latest).

        Any dp x tp layout can load any checkpoint; the RNG states come back only
        when the layout is the saved one. Returns the checkpoint header, or None when
        there is nothing to resume from.
        """
        from mpifc.checkpoint import latest_checkpoint, load, set_rng_state

        path = path or self.ckpt_dir
        if os.path.isdir(path):
            found = self.comm.bcast_obj(latest_checkpoint(path) if self.rank0 else None)
            if found is None:
                return None
        info = load(path, self.model, self.opt, self.grid, key=self.ckpt_key)
        self.loader.load_state_dict(info["data_position"])
        extra = info.get("extra") or {}
        self.step = int(extra.get("step", info["step"]))
        if self.sched is not None and "schedule" in extra:
            vars(self.sched[1]).update(extra["schedule"])
        if info.get("rng_states"):
            for name, gen in generators(self.model).items():
                if name in info["rng_states"]:
                    set_rng_state(gen, info["rng_states"][name])
        if self.rank0 and not self.quiet:
            lay = info["layout"]
            print(f"resumed from {info['path']} (step {self.step}, saved as dp={lay['dp']} x "
                  f"tp={lay['tp']})", flush=True)
        return info

    def finish(self, last: dict) -> dict:
        """Write the trace (if enabled) and print where everything went."""
        paths = {"metrics": self.metrics_path, "checkpoints": self.ckpt_dir}
        if self.cfg["train"]["trace"]:
            got = write_trace(self.comm, os.path.join(self.out, "trace"))
            if self.rank0 and got:
                paths.update({f"trace_{k}": v for k, v in got.items()})
        if self.rank0:
            from mpifc.checkpoint import latest_checkpoint

            paths["checkpoint"] = latest_checkpoint(self.ckpt_dir)
            acc = last.get("test_acc")          # printed even with --quiet: where things went
            print(f"done in {last.get('total_s', 0):.1f} s"
                  + (f": test accuracy {acc:.4f}" if acc is not None else ""))
            print(f"metrics    {self.metrics_path}")
            print(f"checkpoint {paths['checkpoint']}")
            if "trace_chrome" in paths:
                print(f"trace      {paths['trace_chrome']} (Perfetto / chrome://tracing); "
                      f"summary {paths.get('trace_summary', '')}", flush=True)
        return paths


def train(cfg: dict, *, quiet: bool = False, resume: str | bool | None = None,
          out: str | None = None) -> dict:
    """Train ``cfg`` on the world communicator; returns the last epoch's metrics on rank 0."""
    trace.reset()
    trace.enable()
    comm = world()
    sync_clock(comm)
    tr = Trainer(cfg, quiet=quiet, comm=comm, out=out)
    if resume:
        info = tr.resume(resume if isinstance(resume, str) else None)
        if info is None and tr.rank0 and not quiet:
            print(f"nothing to resume in {tr.ckpt_dir}; starting fresh", flush=True)
    last = tr.run()
    last["paths"] = tr.finish(last)
    return last
