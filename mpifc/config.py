"""Training configuration: TOML files, shipped presets, ``--set key=value`` overrides.

A config is a nested dict with these sections (defaults in ``DEFAULTS``)::

    seed = 0
    [data]      dataset (a prepared name: digits, synthetic, synthetic-images; or a
                path to an mpifc HDF5 file), mode ("slice" | "scatter"), dir,
                key_file / key_env (key of an encrypted dataset: a key file, or the
                NAME of an environment variable holding it; "" = clear dataset)
    [model]     input = [C, H, W] or [D]; layers = [{type=..., shard=...}, ...]
    [parallel]  dp, tp (0 = infer from the job size), bucket_mb, overlap
    [optim]     name (sgd | adam | adamw), lr, momentum, nesterov, weight_decay,
                betas, eps, clip_norm (0 = off)
    [schedule]  name (none | step | cosine | plateau) and its settings
    [train]     epochs, batch_size (global, over all data-parallel ranks), dtype,
                out (run directory), checkpoint_every (epochs), keep_last, trace,
                log_every (steps), max_steps (0 = no limit),
                encrypt_key_file / encrypt_key_env (write checkpoints encrypted and
                read them with this key; "" = clear checkpoints)

Presets (``mpifc train digits-cnn``) are TOML files in ``mpifc/presets/``.
"""
from __future__ import annotations

import copy
import os
import tomllib
from importlib import resources

DEFAULTS: dict = {
    "seed": 0,
    "data": {"dataset": "digits", "mode": "slice", "dir": "runs/data",
             "key_file": "", "key_env": ""},       # encryption at rest: "" = off
    "model": {"input": [], "layers": []},
    "parallel": {"dp": 0, "tp": 1, "bucket_mb": 25.0, "overlap": True},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
              "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "clip_norm": 0.0},
    "schedule": {"name": "none", "step_size": 10, "gamma": 0.1, "warmup_steps": 0,
                 "min_lr": 0.0, "factor": 0.5, "patience": 2},
    "train": {"epochs": 10, "batch_size": 64, "dtype": "float32", "out": "runs/{name}",
              "checkpoint_every": 1, "keep_last": 3, "trace": True, "log_every": 0,
              "max_steps": 0, "eval_batch_size": 512,
              "encrypt_key_file": "", "encrypt_key_env": ""},   # encryption at rest: "" = off
}


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, impossible value."""


def preset_names() -> list[str]:
    files = resources.files("mpifc.presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"unknown config key {where + k!r}; known: {sorted(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where + k!r} must be a table")
            out[k] = v if k in ("model",) and not base[k] else _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _parse_value(text: str):
    """A TOML value (number, bool, string, list); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (``train.epochs=3``, ``parallel.tp=2``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--set {key}: unknown key {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = _parse_value(text.strip())
    return cfg


def load_config(source: str, overrides: list[str] | None = None) -> dict:
    """Load a preset name or a TOML path, fill defaults, apply overrides, validate."""
    if os.path.exists(source):
        with open(source, "rb") as f:
            text = f.read().decode()
        name = os.path.splitext(os.path.basename(source))[0]
    elif source in preset_names():
        text = resources.files("mpifc.presets").joinpath(f"{source}.toml").read_text()
        name = source
    else:
        raise ConfigError(f"{source!r} is neither a config file nor a preset; presets: "
                          f"{', '.join(preset_names())}")
    return loads_config(text, name, overrides, where=source)


def loads_config(text: str, name: str | None = None, overrides: list[str] | None = None,
                 where: str = "config") -> dict:
    """A config from TOML text (e.g. the copy stored in a checkpoint)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    stored = raw.pop("name", None)
    cfg = apply_overrides(_merge(DEFAULTS, raw), overrides or [])
    cfg["name"] = name or stored or "run"
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    t, o, p = cfg["train"], cfg["optim"], cfg["parallel"]
    checks = [
        (isinstance(t["epochs"], int) and t["epochs"] >= 1, "train.epochs must be an integer >= 1"),
        (isinstance(t["batch_size"], int) and t["batch_size"] >= 1,
         "train.batch_size must be an integer >= 1"),
        (t["dtype"] in ("float32", "float64"), "train.dtype must be float32 or float64"),
        (o["name"] in ("sgd", "adam", "adamw"), "optim.name must be sgd, adam or adamw"),
        (isinstance(o["lr"], (int, float)) and o["lr"] > 0, "optim.lr must be > 0"),
        (cfg["schedule"]["name"] in ("none", "step", "cosine", "plateau"),
         "schedule.name must be none, step, cosine or plateau"),
        (cfg["data"]["mode"] in ("slice", "scatter"), "data.mode must be slice or scatter"),
        (isinstance(p["dp"], int) and p["dp"] >= 0 and isinstance(p["tp"], int) and p["tp"] >= 0,
         "parallel.dp and parallel.tp must be integers >= 0 (0 = infer)"),
        (bool(cfg["model"]["layers"]), "model.layers is empty"),
        (bool(cfg["model"]["input"]), "model.input (sample shape) is missing"),
        (all(isinstance(v, str) for v in (cfg["data"]["key_file"], cfg["data"]["key_env"],
                                          t["encrypt_key_file"], t["encrypt_key_env"])),
         "data.key_file, data.key_env, train.encrypt_key_file and train.encrypt_key_env are "
         "strings (a path, an environment variable's name; \"\" = off)"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise ConfigError("invalid config: " + "; ".join(bad))


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
