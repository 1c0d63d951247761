"""Typed views of the command-line configuration (no Hydra import: tasks receive plain OmegaConf nodes)."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffprobe.errors import DiffprobeError

T = TypeVar("T")


@dataclass
class ModelSettings:
    name: str = "tiny_sd15"
    tiny: str | None = None  # structure of a tiny random model ("sd15", "sd21", "sdxl", "pixart", "sd3"), else None
    path: str | None = None  # local diffusers directory
    repo_id: str | None = None  # Hugging Face repo, read from the local cache only
    parts_from: str | None = None  # a directory holding every part but the denoiser (mini-dit: mini's)
    word_stream: str = "all"  # text stream(s) whose columns a word's map reads: all, or one (SD3: clip or t5)


@dataclass
class RunSettings:
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    attention_capture: str = "recompute"
    return_freed_memory: bool = True   # large freed CPU blocks go back to the system (diffprobe.memory)


def typed(node: Any, schema: type[T], what: str) -> T:
    """Validate `node` (a DictConfig or dict) against dataclass `schema`; keys the schema lacks are ignored.

    Raises DiffprobeError with one line naming the bad key and value.
    """
    fields = schema.__dataclass_fields__
    values = {k: v for k, v in (OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig)
                                else dict(node)).items() if k in fields}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise DiffprobeError(f"bad {what} setting{f' {key}' if key else ''}: {str(exc).splitlines()[0]}") from None
    settings = OmegaConf.to_object(merged)
    check_values(settings, what)
    return settings


def check_values(settings: Any, what: str) -> None:
    """Refuse NaN and infinite numbers anywhere in a settings dataclass (nested ones and lists included: no setting
    means anything at NaN, and "no limit" is written null), and values outside the class's LIMITS
    ({field: ">= 1" | "> 0" | "0..1" (inclusive) | a tuple of such rules}, a subclass adding to its bases'; null
    values pass)."""
    limits = {k: v for cls in reversed(type(settings).__mro__) for k, v in cls.__dict__.get("LIMITS", {}).items()}
    for name in getattr(settings, "__dataclass_fields__", {}):
        value = getattr(settings, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise DiffprobeError(f"{what}.{name} must be a finite number, not {v}")
            if hasattr(v, "__dataclass_fields__"):
                check_values(v, f"{what}.{name}")
            rules = limits.get(name, ())
            rules = (rules,) if isinstance(rules, str) else rules
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not all(_obeys(v, r) for r in rules):
                said = " and ".join(f"in {r}" if ".." in r else r for r in rules)
                raise DiffprobeError(f"{what}.{name} must be {said}, not {v}")


def _obeys(value: float, rule: str) -> bool:
    if ".." in rule:
        low, high = (float(x) for x in rule.split(".."))
        return low <= value <= high
    op, bound = rule.split()
    return {">=": value >= float(bound), ">": value > float(bound), "<=": value <= float(bound),
            "<": value < float(bound)}[op]


def keys_of(settings: type, exclude: tuple[str, ...] = (), limits: dict | None = None,
            keys: dict[str, tuple[type, Any]] | None = None) -> type:
    """The config schema of a head's (or trainer's) settings dataclass: its fields, types and defaults (written
    once, there) but `exclude` (what the task sets itself, e.g. the seed), as a new dataclass, with `limits` as its
    LIMITS. `keys` {field: (type, default)}: where the key a user writes differs from the field (a type the config
    cannot hold, such as a union of a string and a list, or a default resolved from the model: null)."""
    hints = typing.get_type_hints(settings)

    def spec(f: dataclasses.Field):
        if f.name in (keys or {}):
            kind, default = keys[f.name]
            return f.name, kind, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
        return f.name, hints[f.name], (dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
                                       else dataclasses.field(default_factory=f.default_factory))

    specs = [spec(f) for f in dataclasses.fields(settings) if f.name not in exclude]
    return dataclasses.make_dataclass(settings.__name__, specs, namespace={"LIMITS": limits or {}})


def section(cfg: DictConfig, name: str, schema: type[T], model_defaults: dict[str, str] | None = None) -> T:
    """The typed `name.*` section of the configuration (an empty one when absent); `model_defaults` {field: model
    key}: a field left null takes cfg.model's value for that key (when the model config sets it)."""
    node = cfg.get(name)
    settings = typed(node if node is not None else {}, schema, name)
    model = cfg.get("model") or {}
    for field, key in (model_defaults or {}).items():
        if getattr(settings, field) is None and model.get(key) is not None:
            setattr(settings, field, OmegaConf.to_object(model[key]) if OmegaConf.is_config(model[key])
                    else model[key])
    return settings


def run_fingerprint(cfg: DictConfig) -> dict:
    """The whole resolved configuration of a run, as plain values: a rerun in the same folder must match it."""
    return OmegaConf.to_container(cfg, resolve=True)


def run_config(cfg: DictConfig) -> RunSettings:
    run = typed(cfg, RunSettings, "run")
    if run.dtype not in ("float32", "float16", "bfloat16"):
        raise DiffprobeError(f"dtype must be float32, float16 or bfloat16, not {run.dtype!r}")
    if run.attention_capture not in ("recompute", "reuse"):
        raise DiffprobeError(f"attention_capture must be recompute or reuse, not {run.attention_capture!r}")
    return run


def load_configured_backbone(cfg: DictConfig):
    """The backbone named by cfg.model, on cfg.device in cfg.dtype."""
    from diffprobe.loading import load_backbone

    run = run_config(cfg)
    model = typed(cfg.model, ModelSettings, "model")
    from diffprobe import distributed

    device = distributed.device() if distributed.launched() and run.device == "cuda" else run.device
    try:
        bb = load_backbone(model, device=device, dtype=run.dtype)
        bb.attention_capture = run.attention_capture
        return bb
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA asked for on a machine without it
        raise DiffprobeError(f"cannot put model {model.name} on {run.device}: {str(exc).splitlines()[0]}") from None
