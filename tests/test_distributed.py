"""Runs over two processes (torchrun, gloo on CPU): each process takes its shard, the metrics are added
exactly, so two processes give one process's numbers; a changed number of processes is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_diffseg_task import coco_fixture

REPO = Path(__file__).resolve().parent.parent


def run(tmp: Path, out: Path, processes: int, extra=()) -> subprocess.CompletedProcess:
    list_file = coco_fixture(tmp / "coco", n=5) if not (tmp / "coco").exists() else tmp / "coco" / "subset.txt"
    args = ["-m", "diffprobe", "task=diffseg_eval", "model=tiny_sd15", "data=coco_stuff27", f"data.root={tmp / 'coco'}",
            f"data.list_file={list_file}", "diffseg.anchors=8", "diffseg.tau=0.05", f"hydra.run.dir={out}", *extra]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_port", "29533"]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_two_processes_give_one_process_metrics(tmp_path):
    one = run(tmp_path, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(tmp_path, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert a["results"] == b["results"] and a["segments_per_image"] == b["segments_per_image"]
    shards = sorted(p.name for p in (tmp_path / "two").glob("eval_rank*_state.json"))
    assert shards == ["eval_rank0of2_state.json", "eval_rank1of2_state.json"]
    # each shard holds its own images: 0, 2, 4 and 1, 3
    done = [json.loads((tmp_path / "two" / s).read_text())["done"] for s in shards]
    assert done == [3, 2]
    # the folder of the two-process run cannot be continued by one process (nor the other way round)
    again = run(tmp_path, tmp_path / "two", 1)
    assert again.returncode == 2 and "over 2 process(es); this one has 1" in again.stderr


def test_a_launched_run_needs_one_output_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffprobe", "task=probe"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "needs hydra.run.dir=DIR" in proc.stderr


def test_accelerate_asked_for_processes_it_did_not_start_is_refused_and_multi_gpu_works_on_cpus(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "diffprobe", "task=world", "world.n=4", f"hydra.run.dir={out}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", "2", "--main_process_port", "29541"]
    one = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # accelerate reports the exit code 2 as its own failure; the line before is diffprobe's
    assert one.returncode != 0 and "diffprobe: error: accelerate launch asked for 2 processes but started 1" in one.stderr
    assert "--multi_gpu" in one.stderr and not out.exists()
    two = subprocess.run([*launch, "--multi_gpu", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("diffprobe: outputs in") == 2  # two processes ran


def test_a_folder_is_split_between_processes_and_the_summary_joined(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(folder / f"img{k}.png")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29537", "-m", "diffprobe", "task=diffseg", "model=tiny_sd15", f"image={folder}",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(p).name for p in summary["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert all((out / f"img{k}" / "labels.png").is_file() for k in range(3))
    ranks = [json.loads((out / f"images_rank{r}of2_state.json").read_text())["done"] for r in range(2)]
    assert ranks == [2, 1] and not (out / ".diffprobe.lock").exists()  # both processes shared the lock


def test_data_parallel_gradients_equal_one_process_on_the_same_batch(tmp_path):
    # the gradients the optimiser gets from two processes (one pair each, averaged) equal one process's on both
    from safetensors.torch import load_file

    script = str(Path(__file__).parent / "ddp_gradients.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.safetensors"), str(tmp_path / "ck1")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29539", script, str(tmp_path / "two.safetensors"), str(tmp_path / "ck2")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert float(a[k].abs().max()) > 0, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_the_batch_must_split_evenly_between_processes(tmp_path):
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29540", "-m", "diffprobe",
            "task=hyperfeatures", "model=tiny_sd15", "data=pairs", "data.file=x.json", "batch=3",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0 and "must be a multiple of the 2 processes" in proc.stderr
