"""Training configuration: TOML files, shipped presets, ``--set key=value`` overrides.

A config is a nested dict with these sections (every key, its default, type, range
and meaning: ``SCHEMA`` below; ``DEFAULTS`` is built from it)::

    seed = 0
    [data]      dataset (a prepared name: digits, synthetic, synthetic-images; or a
                path to an mpifc HDF5 file), mode ("slice" | "scatter"), dir,
                key_file / key_env (key of an encrypted dataset: a key file, or the
                NAME of an environment variable holding it; "" = clear dataset),
                augment (["crop", "flip"]: training images only), crop_pad,
                validation_split (fraction of train held out for validation)
    [model]     input = [C, H, W] or [D]; layers = [{type=..., shard=...}, ...]
    [parallel]  dp, tp (0 = infer from the job size), bucket_mb, overlap
    [optim]     name (sgd | adam | adamw), lr, momentum, nesterov, weight_decay,
                betas, eps, clip_norm (0 = off)
    [schedule]  name (none | step | cosine | plateau) and its settings
    [train]     epochs, batch_size (global, over all data-parallel ranks), accumulate
                (micro-batches per step), dtype,
                out (run directory), checkpoint_every (epochs), keep_last, trace,
                log_every (steps), max_steps (0 = no limit), keep_best (metric of
                checkpoints/best.h5: "test_acc" | "test_loss" | "val_acc" | "val_loss" |
                "" off), early_stop (epochs without improvement; 0 = off), watchdog_s (0 = off),
                sign_key (Ed25519 private key file: sign every checkpoint; "" = off),
                verify_key (public key file: resume only checkpoints it signed; "" = off),
                encrypt_key_file / encrypt_key_env (write checkpoints encrypted and
                read them with this key; "" = clear checkpoints)

Presets (``mpifc train digits-cnn``) are TOML files in ``mpifc/presets/``.

Validation. :func:`loads_config` checks the WHOLE config against ``SCHEMA`` once, at
load: every key's type, range or allowed values (a bool is not an integer, NaN and
Inf are not numbers), then the layer table (:func:`mpifc.models.validate_layers`)
and the few rules that span keys (:func:`_cross_checks`). All problems are reported
in one line; each names the key and where its value came from, the file (or preset)
or the ``--set`` item. Validation is a dict walk (about 0.1 ms for a preset).

Adding a key is one line in ``SCHEMA``::

    "train.watchdog_s": number(0.0, ">= 0", "seconds a rank may take for one step; 0 = off"),

with one of the row builders below: ``integer``, ``number`` (an interval such as
``"> 0"``, ``">= 0"``, ``"[0, 1)"``, ``"(0, 1)"``), ``flag``, ``choice``, ``text``,
``sizes``, ``numbers``, ``layer_table``. The key then has a default, is accepted in
files and by ``--set``, is checked at load and written by :func:`to_toml` (so
checkpoints keep it). A new section is just a new prefix.
"""
from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from mpifc.errors import UserError


class ConfigError(UserError, ValueError, all_ranks=True):
    """A config that cannot be used: unknown key, wrong type, impossible value."""


# ------------------------------------------------------------------ the schema rows
@dataclass(frozen=True)
class Key:
    """One config key: its default, what it must be, and what it means."""
    default: object
    want: str                                   # completes "KEY must be ..."
    ok: Callable[[object], bool]
    doc: str
    cast: Callable[[object], object] = lambda v: v      # normalise an accepted value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _interval(spec: str) -> Callable[[float], bool]:
    """``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"(0, 1]"`` ... as a predicate."""
    m = re.fullmatch(r"(>=|>)\s*(\S+)", spec)
    if m:
        lo = float(m.group(2))
        return (lambda v: v >= lo) if m.group(1) == ">=" else (lambda v: v > lo)
    m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", spec)
    if not m:
        raise ValueError(f"bad interval {spec!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    lo_ok = (lambda v: v >= lo) if m.group(1) == "[" else (lambda v: v > lo)
    hi_ok = (lambda v: v <= hi) if m.group(4) == "]" else (lambda v: v < hi)
    return lambda v: lo_ok(v) and hi_ok(v)


def _range_words(spec: str) -> str:
    return spec if spec[0] in "<>" else f"in {spec}"


def integer(default: int, spec: str, doc: str) -> Key:
    inside = _interval(spec)
    return Key(default, f"an integer {_range_words(spec)}", lambda v: _is_int(v) and inside(v), doc)


def number(default: float, spec: str, doc: str) -> Key:
    inside = _interval(spec)
    return Key(default, f"a number {_range_words(spec)}", lambda v: _is_num(v) and inside(v), doc,
               cast=float)


def flag(default: bool, doc: str) -> Key:
    return Key(default, "true or false", lambda v: isinstance(v, bool), doc)


def choice(default: str, choices: tuple, doc: str) -> Key:
    shown = ', '.join(c if c != "" else '"" (off)' for c in choices)
    return Key(default, f"one of {shown}", lambda v: v in choices, doc)


def text(default: str, doc: str, ok: Callable[[str], bool] = lambda v: True,
         want: str = "a non-empty string") -> Key:
    return Key(default, want, lambda v: isinstance(v, str) and v != "" and ok(v), doc)


def key_file(doc: str) -> Key:
    """A key file's path, or "" (off)."""
    return Key("", 'a string (a path or variable name; "" = off)', lambda v: isinstance(v, str), doc)


def sizes(default: list, doc: str) -> Key:
    return Key(default, "a non-empty list of integers >= 1",
               lambda v: isinstance(v, list) and v != [] and all(_is_int(x) and x >= 1 for x in v),
               doc)


def numbers(default: list, n: int, spec: str, doc: str) -> Key:
    inside = _interval(spec)
    return Key(default, f"a list of {n} numbers {_range_words(spec)}",
               lambda v: (isinstance(v, list) and len(v) == n
                          and all(_is_num(x) and inside(x) for x in v)), doc,
               cast=lambda v: [float(x) for x in v])


def layer_table(default: list, doc: str) -> Key:
    """A list of tables; each table is checked by :func:`mpifc.models.validate_layers`."""
    return Key(default, "a list of tables ({type = ...})",
               lambda v: isinstance(v, list), doc)


def _formats_name(v: str) -> bool:
    try:
        v.format(name="run")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _augment_ok(v) -> bool:
    from mpifc.data.augment import parse_augment

    try:
        parse_augment(v)
    except ValueError:
        return False
    return True


def _augment_list(v) -> list:
    from mpifc.data.augment import parse_augment

    return parse_augment(v)


SCHEMA: dict[str, Key] = {
    "seed": integer(0, ">= 0", "seed of the weights, the data order and dropout"),
    "data.dataset": text("digits", "a prepared name (digits, synthetic, synthetic-images, "
                         "synthetic-text) "
                         "or the path of an mpifc HDF5 file"),
    "data.mode": choice("slice", ("slice", "scatter"),
                        "slice: each rank reads its rows; scatter: rank 0 reads and scatters"),
    "data.dir": text("runs/data", "where named datasets are prepared"),
    "data.key_file": key_file("key of an encrypted dataset (32 bytes or 64 hex digits)"),
    "data.key_env": key_file("environment variable holding the dataset key, instead"),
    # --- augmentation and validation (issue 18 item 3; mpifc.data.augment, .validation) ---
    "data.augment": Key([], 'a list of "crop", "flip" (no repeats), or a string "crop,flip"',
                        _augment_ok, "image augmentation of training batches (never evaluation): "
                        "random crop with zero padding, horizontal flip; deterministic from "
                        "(seed, epoch, sample index): the same under any layout or resume",
                        cast=_augment_list),
    "data.crop_pad": integer(4, ">= 0", "crop: zero pixels added per side before the random "
                             "H x W crop"),
    "data.validation_split": number(0.0, "[0, 1)", "fraction of the train split held out for "
                                    "validation (fixed rows: the same for any seed or layout); "
                                    "0 = none"),
    "model.input": Key([], 'a non-empty list of integers >= 1, or ["tokens"] (text)',   # text: issue 13
                       lambda v: sizes([], "").ok(v) or (isinstance(v, list) and 1 <= len(v) <= 2
                                                         and v[0] == "tokens"
                                                         and all(_is_int(x) and x >= 1 for x in v[1:])),
                       'per-sample input shape: [C, H, W] or [D]; ["tokens"] for a text model '
                       '(x = (tokens, offsets)), or ["tokens", L] with L mean tokens per document'),
    "model.layers": layer_table([], "the layer tables, in order (see mpifc.models)"),
    "parallel.dp": integer(0, ">= 0", "data-parallel ranks; 0 = job size / tp"),
    "parallel.tp": integer(1, ">= 0", "tensor-parallel ranks; 0 = job size / dp"),
    "parallel.bucket_mb": number(25.0, ">= 0", "gradient fusion buffer in MiB; 0 = one "
                                 "bucket per parameter"),
    "parallel.overlap": flag(True, "allreduce each bucket during backward"),
    "optim.name": choice("sgd", ("sgd", "adam", "adamw"), "the optimizer"),
    "optim.lr": number(0.05, "> 0", "learning rate (the schedule's base); on --resume a "
                       "changed value replaces the checkpoint's"),
    "optim.momentum": number(0.9, "[0, 1)", "SGD momentum"),
    "optim.nesterov": flag(False, "SGD Nesterov momentum"),
    "optim.weight_decay": number(0.0, ">= 0", "L2 (sgd, adam) or decoupled (adamw) decay"),
    "optim.betas": numbers([0.9, 0.999], 2, "[0, 1)", "Adam moment decay rates"),
    "optim.eps": number(1e-8, "> 0", "Adam denominator guard"),
    "optim.clip_norm": number(0.0, ">= 0", "clip the global gradient norm; 0 = off"),
    "schedule.name": choice("none", ("none", "step", "cosine", "plateau"), "the lr schedule"),
    "schedule.step_size": integer(10, ">= 1", "step: epochs between lr * gamma"),
    "schedule.gamma": number(0.1, "> 0", "step: factor every step_size epochs"),
    "schedule.warmup_steps": integer(0, ">= 0", "cosine: linear warm-up steps (shortened to a "
                                     "tenth of the run when the run is not longer)"),
    "schedule.min_lr": number(0.0, ">= 0", "floor of every schedule: the end of the cosine, "
                              "the lowest step and plateau lr"),
    "schedule.factor": number(0.5, "(0, 1)", "plateau: lr * factor when the watched loss "
                              "(val_loss with data.validation_split, else test_loss) stalls"),
    "schedule.patience": integer(2, ">= 0", "plateau: epochs without improvement first"),
    "train.epochs": integer(10, ">= 1", "passes over the training split"),
    "train.batch_size": integer(64, ">= 1", "global batch, split over the data-parallel ranks"),
    # --- gradient accumulation (issue 18) ---
    "train.accumulate": integer(1, ">= 1", "micro-batches per optimizer step: each rank's rows "
                                "of the global batch_size run in this many parts, gradients "
                                "summed, one allreduce per bucket on the last"),
    "train.dtype": choice("float32", ("float32", "float64"), "parameter and activation type"),
    "train.out": text("runs/{name}", "run directory; {name} is the config's name",
                      ok=_formats_name, want="a path whose only {field} is {name}"),
    "train.checkpoint_every": integer(1, ">= 0", "epochs between checkpoints; 0 = none"),
    "train.keep_last": integer(3, ">= 0", "checkpoints kept; 0 = all"),
    "train.trace": flag(True, "write the per-rank communication trace"),
    "train.log_every": integer(0, ">= 0", "also log every N steps; 0 = per epoch only"),
    "train.max_steps": integer(0, ">= 0", "stop (and checkpoint) after N steps; 0 = no limit"),
    "train.eval_batch_size": integer(512, ">= 1", "global batch of evaluation"),
    "train.watchdog_s": number(0.0, ">= 0", "seconds a rank may take for one step (or an "
                               "evaluation, or a save) before the job is aborted; 0 = off"),
    "train.keep_best": choice("auto", ("auto", "test_acc", "test_loss", "val_acc", "val_loss", ""),
                              "metric kept in checkpoints/best.h5 (never pruned); auto = "
                              "val_acc with data.validation_split, else test_acc; \"\" = off"),
    "train.early_stop": integer(0, ">= 0", "stop after N epochs without a lower watched loss "
                                "(val_loss with data.validation_split, else test_loss); 0 = off"),
    "train.sign_key": key_file("Ed25519 private key file: sign every checkpoint written"),
    "train.verify_key": key_file("public key file: resume only checkpoints it signed"),
    "train.encrypt_key_file": key_file("write checkpoints encrypted with this key (and read them)"),
    "train.encrypt_key_env": key_file("environment variable holding the checkpoint key, instead"),
    # --- GPU (issue 15) ---
    "train.device": choice("cpu", ("cpu", "cuda", "auto"), "cpu: NumPy; cuda: CuPy, one GPU per "
                           "rank by node-local rank (MPIFC_DEVICE_ID overrides); auto: cuda when "
                           "every rank sees a GPU"),
    "train.share_gpu": flag(False, "cuda: let more ranks than GPUs on a node share them"),
}


def _defaults(schema: dict) -> dict:
    out: dict = {}
    for key, spec in schema.items():
        *sections, leaf = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = copy.deepcopy(spec.default)
    return out


DEFAULTS: dict = _defaults(SCHEMA)


def preset_names() -> list[str]:
    files = resources.files("mpifc.presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


# ------------------------------------------------------------------ reading
def _merge(base: dict, over: dict, source: str, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"{source}: unknown config key {path + k!r}; known: {sorted(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {path + k!r} must be a table ([{path + k}])")
            out[k] = _merge(base[k], v, source, f"{path}{k}.")
        else:
            out[k] = v
    return out


def _parse_value(item: str, text: str):
    """A TOML value (number, bool, string, list); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        if text and text[0] in "[{\"'":       # meant as a list, table or string, but malformed
            why = re.sub(r"\s*\(at (line|end) .*\)$", "", str(e)).lower()
            raise ConfigError(f"--set {item}: {text!r} is not a valid TOML value ({why}); "
                              "lists are written [1, 2], strings \"text\"") from None
        return text


def apply_overrides(cfg: dict, overrides: list[str], origins: dict | None = None) -> dict:
    """Apply ``key.sub=value`` strings (``train.epochs=3``, ``parallel.tp=2``).

    ``origins``, when given, receives {dotted key: the ``--set`` item} for messages.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: no section {p!r}")
            node = node[p]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"--set {key}: unknown key {parts[-1]!r}; known: "
                              f"{sorted(k for k in node if not isinstance(node[k], dict))}")
        node[parts[-1]] = _parse_value(item, text.strip())
        if origins is not None:
            origins[key] = f"--set {item}"
    return cfg


def _read_text(source: str) -> str:
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at "
                          f"offset {e.start}); a config is TOML text") from None


def load_config(source: str, overrides: list[str] | None = None) -> dict:
    """Load a preset name or a TOML path, fill defaults, apply overrides, validate.

    Reads on this process alone; a job whose ranks may not all see the file calls
    :func:`load_config_agreed`.
    """
    if os.path.exists(source):
        text = _read_text(source)
        name = os.path.splitext(os.path.basename(source))[0]
    elif source in preset_names():
        text = resources.files("mpifc.presets").joinpath(f"{source}.toml").read_text()
        name = source
    else:
        raise ConfigError(f"{source!r} is neither a config file nor a preset; presets: "
                          f"{', '.join(preset_names())}")
    return loads_config(text, name, overrides, where=source)


def load_config_agreed(source: str, overrides: list[str] | None, comm) -> dict:
    """:func:`load_config` on rank 0 of ``comm``; the config or the error goes to every rank.

    One ``bcast_obj``: a file that only some ranks can read (another node's working
    directory) gives the same result on every rank, never a rank that waits in a
    collective while another has given up.
    """
    got = None
    if comm.rank == 0:
        try:
            got = ("ok", load_config(source, overrides))
        except ConfigError as e:
            got = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - shared below so no rank waits
            got = ("error", f"{source}: {type(e).__name__}: {e}")
    status, value = comm.bcast_obj(got, root=0)
    if status != "ok":
        raise ConfigError(value)
    return value


def loads_config(text: str, name: str | None = None, overrides: list[str] | None = None,
                 where: str = "config") -> dict:
    """A config from TOML text (e.g. the copy stored in a checkpoint)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    stored = raw.pop("name", None)
    origins: dict = {}
    cfg = apply_overrides(_merge(DEFAULTS, raw, where), overrides or [], origins)
    cfg["name"] = name or stored or "run"
    validate(cfg, where, origins)
    return cfg


# ------------------------------------------------------------------ checking
def _show(v) -> str:
    """A value as the user wrote it (TOML spelling for bools, NaN and Inf)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _get(cfg: dict, key: str):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def _set(cfg: dict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[leaf] = value


def _cross_checks(cfg: dict) -> list[tuple[str, str]]:
    """Rules that span keys: (key to blame, message)."""
    out = []
    s, lr = cfg["schedule"], cfg["optim"]["lr"]
    if s["name"] != "none" and s["min_lr"] > lr:
        out.append(("schedule.min_lr", f"schedule.min_lr ({s['min_lr']}) must not exceed "
                                       f"optim.lr ({lr}): it is the schedule's floor"))
    d, t = cfg["data"], cfg["train"]                  # issue 18 item 3
    if t["keep_best"].startswith("val_") and not d["validation_split"]:
        out.append(("train.keep_best", f"train.keep_best = {t['keep_best']!r} needs a "
                                        "validation set: set data.validation_split > 0"))
    inp = cfg["model"]["input"]
    if d["augment"] and not (len(inp) == 3 and all(isinstance(v, int) for v in inp)):
        out.append(("data.augment", f"data.augment = {d['augment']} needs image input "
                                    f"[C, H, W], but model.input is {inp}"))
    return out


def validate(cfg: dict, where: str = "config", origins: dict | None = None) -> None:
    """Check every key of ``cfg`` against ``SCHEMA`` (normalising numbers in place).

    Raises one :class:`ConfigError` listing every problem, each as
    ``ORIGIN: KEY must be ..., got VALUE`` where ORIGIN is the ``--set`` item that set
    the key (from ``origins``) or ``where`` (the file or preset).
    """
    origins = origins or {}
    problems = []

    def blame(key: str, msg: str) -> None:
        origin = next((o for k, o in origins.items() if k == key or key.startswith(k + ".")
                       or key.startswith(k + "[")), where)
        problems.append(f"{origin}: {msg}")

    for key, spec in SCHEMA.items():
        value = _get(cfg, key)
        if spec.ok(value):
            _set(cfg, key, spec.cast(value))
        else:
            blame(key, f"{key} must be {spec.want}, got {_show(value)}")
    layers = cfg["model"]["layers"]
    if isinstance(layers, list):
        from mpifc.models import validate_layers    # the layer table lives with the builders

        try:
            validate_layers(layers)
        except ConfigError as e:
            m = re.match(r"model\.layers(\[\d+\])?", str(e))
            blame(m.group(0) if m else "model.layers", str(e))
    if not problems:
        for key, msg in _cross_checks(cfg):
            blame(key, msg)
    if problems:
        raise ConfigError("; ".join(problems))


# ------------------------------------------------------------------ writing
def to_toml(cfg: dict) -> str:
    """Serialise a config (the subset of TOML it uses) — stored in checkpoints."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for sec, body in cfg.items():
        if isinstance(body, dict):
            lines.append(f"\n[{sec}]")
            for k, v in body.items():
                if k == "layers":
                    lines.append("layers = [\n" + ",\n".join("  " + val(x) for x in v) + ",\n]")
                else:
                    lines.append(f"{k} = {val(v)}")
    return "\n".join(lines) + "\n"
