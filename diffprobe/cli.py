"""Command-line helpers that need no Hydra: the config groups shipped in diffprobe.conf, `--help`, the
`data=PATH` shorthand, and one-line messages for configuration mistakes."""

from __future__ import annotations

import difflib
import re
from importlib import resources

GROUPS = ("task", "model", "data")


def config_options(group: str) -> list[str]:
    """Names of the configs of a group (task, model, data) shipped in diffprobe.conf, sorted."""
    folder = resources.files("diffprobe.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_summary(group: str, name: str) -> str:
    """The first comment line of a group's config file, without the `# ` and `task=NAME: ` prefixes."""
    text = (resources.files("diffprobe.conf") / group / f"{name}.yaml").read_text()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") and not line.startswith("# @package"):
            return re.sub(rf"^#\s*(task={re.escape(name)}:\s*)?", "", line)
    return ""


def rewrite_data_paths(argv: list[str]) -> list[str]:
    """Turn `data=SOME/PATH` (not a config of diffprobe.conf/data) into `data=folder data.root=SOME/PATH`."""
    known = set(config_options("data"))
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "data" and sep and value and value not in known:
            out += ["data=folder", f"data.root={value}"]
        else:
            out.append(arg)
    return out


def help_text() -> str:
    """What `python -m diffprobe --help` prints: the tasks, models and datasets, and where to read more."""
    width = max(len(t) for t in config_options("task"))
    lines = ["usage: python -m diffprobe task=NAME [model=NAME] [data=NAME|PATH] [image=PATH] [key=value ...]", "",
             "tasks:"]
    lines += [f"  {t:<{width}}  {config_summary('task', t)}" for t in config_options("task")]
    lines += ["", "models (model=):   " + ", ".join(config_options("model")) + "   (default: mini)",
              "datasets (data=):  " + ", ".join(config_options("data")) + ", or a folder of images",
              "run settings:      device=cpu|cuda|cuda:1|mps  dtype=float32|float16|bfloat16  seed=0",
              "",
              "Every task's keys and defaults: python -m diffprobe task=NAME --cfg job",
              "Outputs go to outputs/<task>/<date_time>/ (hydra.run.dir=DIR to choose; rerun there to resume).",
              "Documentation: docs/ in the source tree (README.md, docs/<task>.md, docs/hooks.md for the Python API).",
              "Hydra's own options: python -m diffprobe --hydra-help"]
    return "\n".join(lines)


def _choices(group: str) -> str:
    return ", ".join(config_options(group))


def config_error(message: str, known_keys: list[str] | None = None, task: str | None = None,
                 override: str | None = None) -> str:
    """One line for a Hydra composition error's text: the unknown choice or key, and what would be valid;
    `override`: the command-line argument Hydra could not parse, if that was the error."""
    missing = re.search(r"Could not find '(\w+)/([^']*)'", message)
    if missing and missing.group(1) in GROUPS:
        group, value = missing.groups()
        hint = difflib.get_close_matches(value, config_options(group), n=1)
        maybe = f" (did you mean {group}={hint[0]}?)" if hint else ""
        return f"unknown {group} {value!r}{maybe}; choose one of: {_choices(group)}"
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct",
                                                                                 message)
    if unknown:
        key = unknown.group(1)
        hint = difflib.get_close_matches(key, known_keys or [], n=1)
        maybe = f" (did you mean {hint[0]}?)" if hint else ""
        where = f" for task={task}" if task else ""
        return (f"unknown key {key!r}{where}{maybe}; list the keys with: python -m diffprobe "
                f"task={task or 'NAME'} --cfg job")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    if override:
        return f"cannot read {override!r} ({first}); write key=value, lists as key=[a,b], quote spaces"
    return f"bad command line: {first}"
