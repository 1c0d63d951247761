"""`python -m diffprobe task=NAME ...`: the Hydra entry, the only place Hydra is imported at run time.

It runs `diffprobe.tasks.NAME.run(cfg, out_dir)` with out_dir = Hydra's run directory. A DiffprobeError (bad
input, missing weights, incompatible saved state) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def rewrite_data_paths(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """Turn `data=SOME/PATH` (not a config under conf/data/) into `data=folder data.root=SOME/PATH`."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "data" and sep and value and not (conf_dir / "data" / f"{value}.yaml").is_file():
            out += ["data=folder", f"data.root={value}"]
        else:
            out.append(arg)
    return out


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from diffprobe.errors import DiffprobeError

    runtime = HydraConfig.get().runtime
    task, out_dir = runtime.choices["task"], Path(runtime.output_dir)
    try:
        module = importlib.import_module(f"diffprobe.tasks.{task}")
        module.run(cfg, out_dir)
    except DiffprobeError as exc:
        print(f"diffprobe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"diffprobe: interrupted; what was written is in {out_dir}", file=sys.stderr)
        sys.exit(130)
    logging.getLogger("diffprobe").info("outputs in %s", out_dir)
    print(f"diffprobe: outputs in {out_dir}")


def main() -> None:
    import hydra

    sys.argv = [sys.argv[0]] + rewrite_data_paths(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_run)()


if __name__ == "__main__":
    main()
