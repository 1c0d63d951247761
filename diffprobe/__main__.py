"""`python -m diffprobe task=NAME ...`: the Hydra entry, the only place Hydra is imported at run time.

It runs `diffprobe.tasks.NAME.run(cfg, out_dir)` with out_dir = Hydra's run directory. The configs are the
package diffprobe.conf (the repository's conf/). Configuration mistakes (an unknown task, model, dataset or
key) and DiffprobeError (bad input, missing weights, incompatible saved state) end with one line on stderr
and exit code 2; `--help` lists the tasks.

The run folder is created and locked (diffprobe.runfolder) before Hydra writes anything into it, and the task
runs confined to it (diffprobe.io.confined): no file lands outside it.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import time
from pathlib import Path

from diffprobe.cli import TOP_LEVEL, config_error, dotted_keys, help_text, namespace_overrides, rewrite_data_paths

CONFIG_MODULE = "diffprobe.conf"


def _fail(message: str) -> None:
    print(f"diffprobe: error: {message}", file=sys.stderr)
    sys.exit(2)


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from diffprobe.errors import DiffprobeError
    from diffprobe.io import confined
    from diffprobe.runfolder import hold, holds, release

    from diffprobe.config import run_config
    from diffprobe.memory import return_freed_memory

    runtime = HydraConfig.get().runtime
    task, out_dir = runtime.choices["task"], Path(runtime.output_dir)
    sweep_job = not holds(out_dir)  # main() holds the folder of a single run; a sweep's jobs take their own
    try:
        _note(hold(out_dir))
        if run_config(cfg).return_freed_memory:
            return_freed_memory()
        module = importlib.import_module(f"diffprobe.tasks.{task}")
        with confined(out_dir):
            module.run(cfg, out_dir)
    except DiffprobeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print(f"diffprobe: interrupted; what was written is in {out_dir}", file=sys.stderr)
        sys.exit(130)
    finally:
        if sweep_job:
            release(out_dir)
    logging.getLogger("diffprobe").info("outputs in %s", out_dir)
    print(f"diffprobe: outputs in {out_dir}")


def _note(notice: str | None) -> None:
    if notice:
        print(f"diffprobe: note: {notice}", file=sys.stderr)


def prepare_overrides(overrides: list[str]) -> tuple[list[str], str]:
    """Compose the configuration before Hydra runs it: bare task keys get their namespace (tau=0.3 ->
    diffseg.tau=0.3), and a mistake is one line and exit code 2 instead of Hydra's report and exit code 1.
    Returns the overrides and the run folder (hydra.run.dir, unresolved)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from diffprobe.errors import DiffprobeError

    choices = [o for o in overrides if o.split("=", 1)[0] in ("task", "model", "data")]
    task = next((o.split("=", 1)[1] for o in choices if o.startswith("task=")), "probe")
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            base = OmegaConf.to_container(compose("config", overrides=choices))
        except HydraException as exc:
            _fail(config_error(str(exc), [], task, getattr(exc, "override", None)))
        keys = {ns: dotted_keys(v) for ns, v in base.items() if isinstance(v, dict) and ns not in TOP_LEVEL}
        try:
            overrides = namespace_overrides(overrides, keys, task)
            overrides = model_task_settings(base.get("model") or {}, keys, overrides) + overrides
            full = compose("config", overrides=overrides, return_hydra_config=True)
        except DiffprobeError as exc:
            _fail(str(exc))
        except HydraException as exc:
            known = [f"{ns}.{k}" for ns, ks in keys.items() for k in ks] + list(base)
            _fail(config_error(str(exc), known, task, getattr(exc, "override", None)))
    return overrides, OmegaConf.to_container(full.hydra.run, resolve=False)["dir"]


def model_task_settings(model: dict, keys: dict[str, list[str]], overrides: list[str]) -> list[str]:
    """The model config's `task_settings` ({namespace: {key: value}}: this model's defaults for task keys) as
    overrides, for the namespaces of this task and the keys the command line does not set."""
    from diffprobe.cli import flat_keys, override_value

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    out = []
    for ns, settings in (model.get("task_settings") or {}).items():
        for key, value in flat_keys(settings or {}):
            if ns in keys and key in keys[ns] and f"{ns}.{key}" not in given:
                out.append(f"{ns}.{key}={override_value(value)}")
    return out


def resolve_run_dir(template: str, task: str) -> Path | None:
    """The run folder from hydra.run.dir's text: ${hydra:runtime.choices.task} and ${now:FORMAT} filled in
    (None if other interpolations remain: Hydra resolves those)."""
    text = template.replace("${hydra:runtime.choices.task}", task)
    text = re.sub(r"\$\{now:([^}]*)\}", lambda m: time.strftime(m.group(1)), text)
    return None if "${" in text else Path(text)


VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--info", "-i", "--experimental-rerun")


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the key=value overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in VALUE_FLAGS and i + 1 < len(argv) and "=" not in argv[i + 1]:
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def main() -> None:
    import hydra

    argv = rewrite_data_paths(sys.argv[1:])
    if any(a in ("--help", "-h") for a in argv):
        print(help_text())
        return
    flags, overrides = split_flags(argv)
    from diffprobe.distributed import launched, unstarted_processes

    asked = unstarted_processes()
    if asked:
        _fail(f"accelerate launch asked for {asked} processes but started 1 process (it does so without GPUs): add "
              f"--multi_gpu (gloo between CPU processes), or use torchrun --nproc_per_node {asked}")
    if launched() and not any(o.startswith("hydra.run.dir=") for o in overrides):
        _fail("a run over several processes needs hydra.run.dir=DIR: every process must write into the same folder")
    run_dir = None
    if not any(f in ("-m", "--multirun") for f in flags):  # sweeps (a=1,2) are Hydra's to expand
        overrides, template = prepare_overrides(overrides)
        if not any(f in NO_JOB_FLAGS for f in flags):
            run_dir = take_run_dir(overrides, template)
            if run_dir is not None and not any(o.startswith("hydra.run.dir=") for o in overrides):
                overrides.append(f"hydra.run.dir={run_dir}")
    sys.argv = [sys.argv[0]] + flags + overrides
    try:
        hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(_run)()
    finally:
        if run_dir is not None:
            from diffprobe.runfolder import release

            release(run_dir)


NO_JOB_FLAGS = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc", "--resolve")


def take_run_dir(overrides: list[str], template: str) -> Path | None:
    """Create the run folder and lock it for this run, before Hydra writes into it; None when Hydra must
    resolve its name (then the task takes the lock). A default (timestamped) folder that exists already, from a
    run started in the same second, is replaced by the next free one: _2, _3, ..."""
    from diffprobe.errors import DiffprobeError
    from diffprobe.runfolder import hold, make_run_dir

    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "probe")
    chosen = any(o.startswith("hydra.run.dir=") for o in overrides)
    base = resolve_run_dir(template, task)
    if base is None:
        return None
    run_dir, n = base, 1
    while not chosen and run_dir.exists():
        n += 1
        run_dir = Path(f"{base}_{n}")
    try:
        make_run_dir(run_dir)
        _note(hold(run_dir))
    except DiffprobeError as exc:
        _fail(str(exc))
    return run_dir


if __name__ == "__main__":
    main()
