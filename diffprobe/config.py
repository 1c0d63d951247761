"""Typed views of the command-line configuration (no Hydra import: tasks receive plain OmegaConf nodes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffprobe.errors import DiffprobeError

T = TypeVar("T")


@dataclass
class ModelConfig:
    name: str = "tiny_sd15"
    tiny: str | None = None  # structure of a tiny random model ("sd15", "sd21", "sdxl", "pixart", "sd3"), else None
    path: str | None = None  # local diffusers directory
    repo_id: str | None = None  # Hugging Face repo, read from the local cache only
    parts_from: str | None = None  # a directory holding every part but the denoiser (mini-dit: mini's)


@dataclass
class RunConfig:
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    attention_capture: str = "recompute"


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
        raise DiffprobeError(f"bad {what} setting: {str(exc).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


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


def run_config(cfg: DictConfig) -> RunConfig:
    run = typed(cfg, RunConfig, "run")
    if run.dtype not in ("float32", "float16", "bfloat16"):
        raise DiffprobeError(f"dtype must be float32, float16 or bfloat16, not {run.dtype!r}")
    if run.attention_capture not in ("recompute", "reuse"):
        raise DiffprobeError(f"attention_capture must be recompute or reuse, not {run.attention_capture!r}")
    return run


def load_configured_backbone(cfg: DictConfig):
    """The backbone named by cfg.model, on cfg.device in cfg.dtype."""
    from diffprobe.backbones import load_backbone

    run = run_config(cfg)
    model = typed(cfg.model, ModelConfig, "model")
    from diffprobe import distributed

    device = distributed.device() if distributed.launched() and run.device == "cuda" else run.device
    try:
        bb = load_backbone(model, device=device, dtype=run.dtype)
        bb.attention_capture = run.attention_capture
        return bb
    except (RuntimeError, AssertionError) as exc:  # e.g. CUDA asked for on a machine without it
        raise DiffprobeError(f"cannot put model {model.name} on {run.device}: {str(exc).splitlines()[0]}") from None
