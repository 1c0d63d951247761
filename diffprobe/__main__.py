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

from diffprobe.cli import config_error, help_text, rewrite_data_paths

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


def check_overrides(overrides: list[str]) -> None:
    """Compose the configuration once before Hydra runs it, so a mistake is one line and exit code 2
    instead of Hydra's multi-line report and exit code 1."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            compose("config", overrides=overrides, return_hydra_config=True)
        except HydraException as exc:
            choices = [o for o in overrides if o.split("=", 1)[0] in ("task", "model", "data")]
            task = next((o.split("=", 1)[1] for o in choices if o.startswith("task=")), "probe")
            try:
                cfg = compose("config", overrides=choices)
                keys = [k for k in _dotted_keys(OmegaConf.to_container(cfg))]
            except HydraException:
                keys = []
            _fail(config_error(str(exc), keys, task, getattr(exc, "override", None)))


def _dotted_keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, dict):
            out += _dotted_keys(value, name + ".")
    return out


def main() -> None:
    import hydra

    argv = rewrite_data_paths(sys.argv[1:])
    if any(a in ("--help", "-h") for a in argv):
        print(help_text())
        return
    if not any(a.startswith("-") for a in argv):  # Hydra flags (--cfg, -m, ...) go to Hydra as they are
        check_overrides(argv)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(_run)()


if __name__ == "__main__":
    main()
