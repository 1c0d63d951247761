"""Command-line helpers that need no Hydra: the config groups shipped in diffprobe.conf, `--help`, the
`data=PATH` shorthand, and one-line messages for configuration mistakes."""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources

GROUPS = ("task", "model", "data")
TOP_LEVEL = ("task", "model", "data", "device", "dtype", "seed", "image", "attention_capture",
             "return_freed_memory", "hydra")
# keys of earlier releases that now have another name (under the task's namespace)
RENAMED = {"add_noise": "noise", "feature_upsample_res": "upsample_queries", "predict_batch": "predict.batch_size",
           "eval_train": "eval.train", "eval_test": "eval.test"}


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


def namespace_overrides(argv: list[str], keys: dict[str, list[str]], task: str) -> list[str]:
    """Give bare `key=value` arguments their namespace: `tau=0.3` with task=diffseg is `diffseg.tau=0.3`.

    keys: namespace -> its dotted keys in the composed configuration of the task. A bare key found in
    exactly one place is rewritten; one found in several is an error naming them; a renamed key of an
    earlier release is an error naming the new one; anything else is left to Hydra.
    """
    from diffprobe.errors import DiffprobeError

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or "." in key or key in TOP_LEVEL or not key[:1].isalpha():
            out.append(arg)
            continue
        if key in RENAMED:
            new = RENAMED[key]
            where = next((ns for ns, ks in keys.items() if new in ks), task)
            raise DiffprobeError(f"{key} is now {where}.{new}: write {where}.{new}={value}")
        hits = [f"{ns}.{k}" for ns, ks in keys.items() for k in ks if k == key or k.endswith("." + key)]
        if len(hits) > 1:
            raise DiffprobeError(f"{key} is ambiguous for task={task}: write one of {', '.join(hits)}")
        out.append(f"{hits[0]}={value}" if hits else arg)
    return out


def flat_keys(node: dict, prefix: str = "", sections: bool = False) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested dict; with `sections`, of every nested dict too (before its
    keys): the names a user may write."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += ([(f"{prefix}{key}", value)] if sections else []) + flat_keys(value, f"{prefix}{key}.", sections)
        else:
            out.append((f"{prefix}{key}", value))
    return out


def dotted_keys(node: dict) -> list[str]:
    """Every key of a nested config section a user may write, dotted (sections included)."""
    return [key for key, _ in flat_keys(node, sections=True)]


def override_value(value) -> str:
    """A value written in Hydra's override syntax: null, true/false, numbers, quoted strings, [lists]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def docs_folder() -> str:
    """Where the installed documentation is (the package diffprobe.docs: docs/ of the source tree)."""
    return str(resources.files("diffprobe.docs"))


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
              f"Documentation: {docs_folder()} (<task>.md for each task, outputs.md for the files a run writes, "
              "hooks.md for the Python API)",
              "Hydra's own options: python -m diffprobe --hydra-help"]
    return "\n".join(lines)


def _choices(group: str) -> str:
    return ", ".join(config_options(group))


def close_matches(word: str, options: list[str], cutoff: float = 0.6) -> list[str]:
    """The options nearest to `word` (similarity ratio at least `cutoff`, ties broken by the longer common
    prefix), all of those equally near: sd16 -> sd14, sd15; taus -> tau."""
    def score(option: str) -> tuple[float, int]:
        prefix = len(os.path.commonprefix([word.lower(), option.lower()]))
        return round(difflib.SequenceMatcher(None, word.lower(), option.lower()).ratio(), 6), prefix

    scored = sorted(((score(o), o) for o in options if score(o)[0] >= cutoff), key=lambda so: so[0], reverse=True)
    return [o for sc, o in scored if sc == scored[0][0]] if scored else []


def config_error(message: str, known_keys: list[str] | None = None, task: str | None = None,
                 override: str | None = None) -> str:
    """One line for a Hydra composition error's text: the unknown choice or key, and what would be valid;
    `override`: the command-line argument Hydra could not parse, if that was the error."""
    missing = re.search(r"Could not find '(\w+)/([^']*)'", message)
    if missing and missing.group(1) in GROUPS:
        group, value = missing.groups()
        hint = close_matches(value, config_options(group))
        maybe = f" (did you mean {' or '.join(f'{group}={h}' for h in hint)}?)" if hint else ""
        return f"unknown {group} {value!r}{maybe}; choose one of: {_choices(group)}"
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct",
                                                                                 message)
    if unknown:
        key = unknown.group(1)
        known = known_keys or []
        if "." in key:
            hint = close_matches(key, known)
        else:  # a bare key: the task's own keys (by their last part) first, then the run settings
            last: dict[str, list[str]] = {}
            for k in known:
                last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
            own = [k for k in last if any("." in full for full in last[k])]
            hint = [full for m in close_matches(key, own) for full in last[m]]
            hint = hint or close_matches(key, [k for k in known if "." not in k], cutoff=0.75)
        maybe = f" (did you mean {' or '.join(hint[:3])}?)" if hint else ""
        where = f" for task={task}" if task else ""
        return (f"unknown key {key!r}{where}{maybe}; list the keys with: python -m diffprobe "
                f"task={task or 'NAME'} --cfg job")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    if override:
        return f"cannot read {override!r} ({first}); write key=value, lists as key=[a,b], quote spaces"
    return f"bad command line: {first}"
