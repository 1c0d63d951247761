"""Hostile settings: every numeric key of every task, fed NaN, infinities, zero, negatives, huge values and wrong
types, ends in a one-line error or a run whose outputs are whole, strict JSON and inside the run folder.

Two tiers:
- every (task, key, value) through the task's settings_of (the validation every run does before loading a
  model): it returns, or raises DiffprobeError (the CLI's one line), or the value is refused by the config
  schema when composed (the CLI's one line too, checked once per kind through the real command);
- a hypothesis sample of whole runs through the real entry point, in this process on a tiny model, each with a
  time budget: exit 0 with strict-JSON outputs inside the run folder, or exit 2 with one `diffprobe: error:` line.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from diffprobe.cli import TOP_LEVEL, config_options, flat_keys
from diffprobe.errors import DiffprobeError

HOSTILE = ["nan", "inf", "-inf", "0", "-1", "-0.5", "1e30", "123456789012", "abc", "[1]", "true"]
# what each task needs besides the key under test, so that its settings_of reaches every key
BASE = {
    "correspond": ["correspond.source=a.png", "correspond.target=b.png"],
    "diffseg_eval": ["data=coco_stuff27", "data.root=nowhere"],
    "localize_eval": ["data=cub", "data.root=nowhere"],
    "keypoints": ["keypoints.embeddings=none.safetensors"],
}


def _numeric_keys() -> list[tuple[str, str]]:
    """(task, dotted key) of every key of every task whose default is a number or null."""
    out = []
    with initialize_config_module(config_module="diffprobe.conf", version_base="1.3"):
        for task in config_options("task"):
            cfg = OmegaConf.to_container(compose("config", overrides=[f"task={task}"]))
            for ns, node in cfg.items():
                if isinstance(node, dict) and ns not in TOP_LEVEL:
                    out += [(task, f"{ns}.{k}") for k, v in flat_keys(node)
                            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    return out


KEYS = _numeric_keys()


_BASES: dict[str, object] = {}


def _settings(task: str, overrides: list[str]):
    """settings_of(cfg) for task=<task> with `overrides` applied as Hydra parses them (the base config of each task
    is composed once; composing again for each case would take minutes)."""
    if task not in _BASES:
        with initialize_config_module(config_module="diffprobe.conf", version_base="1.3"):
            _BASES[task] = compose("config", overrides=[f"task={task}", "model=tiny_sd15", *BASE.get(task, [])])
    cfg = copy.deepcopy(_BASES[task])
    OmegaConf.set_struct(cfg, False)
    for override in OverridesParser.create().parse_overrides(overrides):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return importlib.import_module(f"diffprobe.tasks.{task}").settings_of(cfg)


def test_the_fuzzed_keys_cover_every_task():
    assert {t for t, _ in KEYS} == set(config_options("task")) and len(KEYS) > 150


def test_every_numeric_key_takes_hostile_values_without_a_crash():
    crashes, refused, passed = [], 0, 0
    for task, key in KEYS:
        for value in HOSTILE:
            try:
                _settings(task, [f"{key}={value}"])
                passed += 1
            except (DiffprobeError, HydraException, OmegaConfBaseException):
                refused += 1
            except Exception as exc:  # noqa: BLE001 - what this test exists to find
                crashes.append(f"{task} {key}={value}: {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes)
    assert refused + passed == len(KEYS) * len(HOSTILE) and refused > passed


@pytest.mark.parametrize("task,override", [("diffseg", "diffseg.tau=nan"), ("keypoints", "keypoints.fit.lr=nan"),
                                           ("keypoints", "keypoints.predict.soft_radius=inf"),
                                           ("world", "world.n=0"), ("templates", "templates.k=-1"),
                                           ("diffseg_eval", "diffseg_eval.limit=0"),
                                           ("hyperfeatures", "hyperfeatures.lr=-inf")])
def test_nonsense_numbers_are_refused(task, override):
    with pytest.raises(DiffprobeError, match=override.split("=")[0].split(".")[-1]):
        _settings(task, [override])


# -- whole runs ---------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CHEAP = {  # tasks that run in seconds on a tiny model, with what they need
    "diffseg": ["model=tiny_sd15", "image=img.png"],
    "localize": ["model=tiny_sd15", "image=img.png", "localize.words=[cat]", "localize.prompt=a cat"],
    "probe": ["model=tiny_sd15", "image=img.png"],
    "world": ["world.n=2"],
    "templates": ["templates.n=20", "templates.k=2", "templates.restarts=1"],
    "correspond": ["model=tiny_sd15", "correspond.source=img.png", "correspond.target=img.png"],
}
VALUES = (st.sampled_from(HOSTILE) | st.integers(-10**6, 10**6).map(str) | st.floats(allow_nan=True).map(repr)
          | st.integers(0, 8).map(str) | st.floats(0, 2).map(repr))  # plausible values: whole runs too


class OverBudget(BaseException):
    """A case still running when its time budget ends (a legitimately long run, not a failure)."""


def run_cli(args: list[str], cwd: Path, budget: float, capsys) -> tuple[int | None, str]:
    """Run `python -m diffprobe ARGS` in this process from `cwd`: (exit code, None if over budget; stderr)."""
    from diffprobe.__main__ import main

    def stop(*_):
        raise OverBudget

    previous, old_cwd, old_argv = signal.signal(signal.SIGALRM, stop), os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["diffprobe", *args]
    code: int | None = 0
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except OverBudget:
        code = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        sys.argv = old_argv
    return code, capsys.readouterr().err


def check_outputs(run: Path, root: Path, inputs: set[str]) -> None:
    """Every output is inside the run folder, whole, strict JSON where JSON, and has the umask's mode."""
    from safetensors.torch import load_file

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    mode = 0o666 & ~0o027
    for path in root.rglob("*"):
        if path.is_dir() or path.name in inputs:
            continue
        assert run in path.parents, f"{path} is outside the run folder"
        if path.name.startswith(".") or ".hydra" in path.parts or path.suffix == ".log":
            continue
        assert path.stat().st_mode & 0o777 == mode, f"{path}: mode {oct(path.stat().st_mode & 0o777)}"
        if path.suffix == ".json":
            json.loads(path.read_text(), parse_constant=refuse)
        elif path.suffix == ".png":
            Image.open(path).load()
        elif path.suffix == ".safetensors":
            load_file(str(path))


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from([(t, k) for t, k in KEYS if t in CHEAP]), value=VALUES)
def test_whole_runs_with_hostile_values_end_cleanly(case, value, tmp_path_factory, capsys):
    task, key = case
    root = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img.png")
    run = root / "run"
    old = os.umask(0o027)
    try:
        code, err = run_cli([f"task={task}", *CHEAP[task], f"{key}={value}", f"hydra.run.dir={run}"], root, 20.0,
                            capsys)
    finally:
        os.umask(old)
    assert "Traceback" not in err, err
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("diffprobe: error: "), err
    else:
        assert code in (0, None), (code, err)
    check_outputs(run, root, {"img.png"})


def test_every_task_writes_strict_json_inside_its_run_folder(tmp_path, capsys):
    """Each task run once on small settings through the command line: exit 0, and every file it wrote is inside
    its run folder (or the output folder it was given), whole, strict JSON and of the umask's mode."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    tiny = ["model=tiny_sd15"]
    kp = ["keypoints.fit.steps=2", "keypoints.fit.num_tokens=16", "keypoints.fit.top_k=2", "keypoints.fit.candidates=4",
          "keypoints.fit.num_indices=2", "keypoints.fit.batch_size=1", "keypoints.upsample_queries=16",
          "keypoints.predict.augmentations=2", "keypoints.predict.batch_size=2", "keypoints.preview=1"]
    runs = [
        ("world_coco", ["task=world", "world.format=coco_stuff", "world.n=2", f"world.out={tmp_path / 'data/coco'}"]),
        ("world_celeba", ["task=world", "world.format=celeba", "world.n=2", "world.n_train=2",
                          f"world.out={tmp_path / 'data/celeba'}"]),
        ("world_cub", ["task=world", "world.format=cub", "world.n=2", "world.n_train=2",
                       f"world.out={tmp_path / 'data/cub'}"]),
        ("diffseg", ["task=diffseg", *tiny, "image=img.png", "diffseg.anchors=8", "diffseg.labels=[cat,sky]"]),
        ("localize", ["task=localize", *tiny, "image=img.png", "localize.words=[cat]", "localize.prompt=a cat"]),
        ("probe", ["task=probe", *tiny, "image=img.png"]),
        ("analyze", ["task=analyze", *tiny, "image=img.png", "analyze.tasks=[diffseg,localize]", "diffseg.anchors=8",
                     "localize.words=[cat]", "localize.prompt=a cat"]),
        ("templates", ["task=templates", "templates.n=20", "templates.k=2"]),
        ("correspond", ["task=correspond", *tiny, "correspond.source=img.png", "correspond.target=img.png",
                        "correspond.points=[[10,10],[30,20]]", "correspond.target_points=[[10,10],[31,20]]"]),
        ("diffseg_eval", ["task=diffseg_eval", *tiny, "data=coco_stuff27", f"data.root={tmp_path / 'data/coco'}",
                          "diffseg.anchors=8"]),
        ("localize_eval", ["task=localize_eval", *tiny, "data=cub", f"data.root={tmp_path / 'data/cub/CUB_200_2011'}"]),
        ("keypoints_fit", ["task=keypoints", *tiny, "data=celeba", f"data.root={tmp_path / 'data/celeba'}", *kp]),
        ("keypoints_predict", ["task=keypoints", *tiny, "mode=predict", "image=img.png", *kp,
                               f"embeddings={tmp_path / 'keypoints_fit/keypoints.safetensors'}"]),
        ("keypoints_eval", ["task=keypoints", *tiny, "mode=eval", "data=celeba", f"data.root={tmp_path / 'data/celeba'}",
                            *kp, f"embeddings={tmp_path / 'keypoints_fit/keypoints.safetensors'}"]),
    ]
    old = os.umask(0o027)
    try:
        for name, args in runs:
            code, err = run_cli([*args, f"hydra.run.dir={tmp_path / name}"], tmp_path, 120.0, capsys)
            assert code == 0, (name, err[-3000:])
    finally:
        os.umask(old)
    for name, _ in runs:
        assert any((tmp_path / name).rglob("*.json")), name
    assert {p.name for p in tmp_path.iterdir()} == {"img.png", "data", *(name for name, _ in runs)}  # nothing else
    check_outputs(tmp_path, tmp_path, {"img.png"})
