"""Configuration mistakes end in one line naming what is valid, with exit code 2; --help lists the tasks."""

import subprocess
import sys

import pytest

from diffprobe.cli import config_error, config_options


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diffprobe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,expected", [
    (["task=segment"], "unknown task 'segment'"),
    (["model=sd16"], "unknown model 'sd16'"),
    (["task=diffseg", "tua=0.3"], "unknown key 'tua' for task=diffseg (did you mean diffseg.tau?)"),
    (["task=keypoints", "batch_size=2"], "ambiguous"),
    (["task=keypoints", "feature_upsample_res=64"], "keypoints.upsample_queries"),
    (["task=diffseg", "tau=["], "cannot read 'diffseg.tau=['"),
])
def test_config_mistakes_are_one_line_with_exit_code_2(tmp_path, args, expected):
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("diffprobe: error: ") and res.stderr.strip().count("\n") == 0, res.stderr
    assert expected in res.stderr
    assert not list(tmp_path.iterdir())  # nothing was run, no output folder made


def test_unknown_choices_list_the_valid_ones():
    line = config_error("In 'config': Could not find 'task/segmnet'\n\nAvailable options in 'task':\n\tdiffseg")
    assert line.startswith("unknown task 'segmnet'") and ", ".join(config_options("task")) in line
    assert "diffseg" in config_options("task") and "mini" in config_options("model")


def test_help_lists_tasks_models_and_docs(tmp_path):
    res = run("--help", cwd=tmp_path)
    assert res.returncode == 0
    for word in config_options("task") + ["mini", "sd15", "docs/", "--cfg job"]:
        assert word in res.stdout, word
