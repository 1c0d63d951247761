"""Build task configurations for tests from the real config files (diffprobe.conf) the CLI composes, with
bare keys given their namespace as on the command line (tau=0.1 -> diffseg.tau)."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffprobe.cli import TOP_LEVEL, dotted_keys, namespace_overrides


def make_cfg(task: str, model="tiny_sd15", data=None, **overrides):
    """The composed config of task=<task> model=<model> (a name, or a dict replacing cfg.model), with
    `data` (a dict) as cfg.data and every other keyword set at its namespaced key."""
    with initialize_config_module(config_module="diffprobe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}"] + ([f"model={model}"] if isinstance(model, str) else []))
    OmegaConf.set_struct(cfg, False)
    if not isinstance(model, str):
        cfg.model = OmegaConf.create(OmegaConf.to_container(model) if OmegaConf.is_config(model) else model)
    if data is not None:
        cfg.data = OmegaConf.create(OmegaConf.to_container(data) if OmegaConf.is_config(data) else data)
    plain = OmegaConf.to_container(cfg)
    keys = {ns: dotted_keys(v) for ns, v in plain.items() if isinstance(v, dict) and ns not in TOP_LEVEL}
    for key, value in overrides.items():
        if key.split(".")[0] in TOP_LEVEL or key.split(".")[0] in keys:
            path = key
        elif "." in key:  # relative to the task's namespace, e.g. fit.batch_size
            path = f"{task}.{key}"
        else:
            path = namespace_overrides([f"{key}=x"], keys, task)[0].split("=")[0]
        OmegaConf.update(cfg, path, value, merge=False)
    return cfg
