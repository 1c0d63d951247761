"""A normal install runs: the wheel carries the configs and the mini weights, and a task runs from a folder
outside the repository with nothing of the source tree on the path."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A venv holding only the built wheel; the current environment's site-packages (torch, diffusers, ...)
    are appended to its path by a plain .pth line, so their own .pth files (an editable diffprobe's finder
    among them) are not processed and the wheel's diffprobe is the one imported."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
                            str(REPO)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr
    (wheel,) = (root / "dist").glob("diffprobe-*.whl")
    venv.create(root / "venv", with_pip=True)
    py = root / "venv" / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "outer_environment.pth").write_text("\n".join(outer) + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return py, root, wheel


def run(py, args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(py), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_wheel_carries_configs_and_weights(wheel_env):
    py, root, wheel = wheel_env
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "diffprobe/conf/config.yaml" in names and "diffprobe/conf/task/diffseg.yaml" in names
    assert "diffprobe/assets/mini/unet/diffusion_pytorch_model.safetensors" in names
    assert "diffprobe/assets/mini_dit/transformer/diffusion_pytorch_model.safetensors" in names
    assert "diffprobe/docs/outputs.md" in names and "diffprobe/docs/img/keypoints_world_faces.png" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: test" in metadata and "Provides-Extra: cuda" in metadata  # pip install diffprobe[test]
    where = run(py, ["-c", "import diffprobe, diffprobe.conf; print(diffprobe.__file__)"], root)
    assert where.returncode == 0, where.stderr
    assert str(root / "venv") in where.stdout and str(REPO) not in where.stdout
    out = root / "run"
    res = run(py, ["-m", "diffprobe", "task=diffseg", f"hydra.run.dir={out}"], root)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [v["num_segments"] >= 2 for v in summary["images"].values()] == [True]
    assert (out / "demo_scene" / "figure.png").is_file()


def test_wheel_install_reports_config_mistakes_in_one_line(wheel_env):
    py, root, _ = wheel_env
    res = run(py, ["-m", "diffprobe", "task=segment"], root)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "diffseg" in res.stderr
    helped = run(py, ["-m", "diffprobe", "--help"], root)
    assert helped.returncode == 0 and "keypoints" in helped.stdout
    docs = Path(next(x for x in helped.stdout.splitlines() if x.startswith("Documentation: ")).split()[1])
    assert str(root / "venv") in str(docs) and (docs / "outputs.md").is_file() and (docs / "keypoints.md").is_file()
