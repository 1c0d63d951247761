"""`python -m diffprobe task=NAME ...`: the Hydra entry, the only place Hydra is imported at run time.

It runs `diffprobe.tasks.NAME.run(cfg, out_dir)` with out_dir = Hydra's run directory. The configs are the
package diffprobe.conf (the repository's conf/). Configuration mistakes (an unknown task, model, dataset or
key) and DiffprobeError (bad input, missing weights, incompatible saved state) end with one line on stderr
and exit code 2; `--help` lists the tasks.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from diffprobe.cli import TOP_LEVEL, config_error, help_text, namespace_overrides, rewrite_data_paths

CONFIG_MODULE = "diffprobe.conf"


def _fail(message: str) -> None:
    print(f"diffprobe: error: {message}", file=sys.stderr)
    sys.exit(2)


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from diffprobe.errors import DiffprobeError

    runtime = HydraConfig.get().runtime
    task, out_dir = runtime.choices["task"], Path(runtime.output_dir)
    try:
        module = importlib.import_module(f"diffprobe.tasks.{task}")
        module.run(cfg, out_dir)
    except DiffprobeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print(f"diffprobe: interrupted; what was written is in {out_dir}", file=sys.stderr)
        sys.exit(130)
    logging.getLogger("diffprobe").info("outputs in %s", out_dir)
    print(f"diffprobe: outputs in {out_dir}")


def prepare_overrides(overrides: list[str]) -> list[str]:
    """Compose the configuration before Hydra runs it: bare task keys get their namespace (tau=0.3 ->
    diffseg.tau=0.3), and a mistake is one line and exit code 2 instead of Hydra's report and exit code 1."""
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
        keys = {ns: _dotted_keys(v) for ns, v in base.items() if isinstance(v, dict) and ns not in TOP_LEVEL}
        try:
            overrides = namespace_overrides(overrides, keys, task)
            compose("config", overrides=overrides, return_hydra_config=True)
        except DiffprobeError as exc:
            _fail(str(exc))
        except HydraException as exc:
            known = [f"{ns}.{k}" for ns, ks in keys.items() for k in ks] + list(base)
            _fail(config_error(str(exc), known, task, getattr(exc, "override", None)))
    return overrides


def _dotted_keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, dict):
            out += _dotted_keys(value, name + ".")
    return out


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
    from diffprobe.distributed import launched

    if launched() and not any(o.startswith("hydra.run.dir=") for o in overrides):
        _fail("a run over several processes needs hydra.run.dir=DIR: every process must write into the same folder")
    if not any(f in ("-m", "--multirun") for f in flags):  # sweeps (a=1,2) are Hydra's to expand
        overrides = prepare_overrides(overrides)
    sys.argv = [sys.argv[0]] + flags + overrides
    hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(_run)()


if __name__ == "__main__":
    main()
