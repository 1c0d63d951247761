"""Nothing lost, nobody out: a run folder belongs to one run, no file lands outside it, folder runs resume and
survive any one image's failure, and names made from user text are safe."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli, one_line_error
from PIL import Image

from diffprobe.errors import DiffprobeError
from diffprobe.io import confined, save_json, save_png
from diffprobe.runfolder import LOCK_NAME, hold, image_folders, release, safe_name, unique_names


def _plant_lock(folder: Path, pid: int, start: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "start": start, "host": os.uname().nodename,
                                                "started": time.time(), "command": "diffprobe task=keypoints"}))


def test_a_held_run_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from diffprobe.runfolder import _process_start

        _plant_lock(run, holder.pid, _process_start(holder.pid))
        res = cli("task=world", "world.n=1", f"hydra.run.dir={run}", cwd=tmp_path)
        line = one_line_error(res, "is in use by another run")
        assert f"pid {holder.pid}" in line and "diffprobe task=keypoints" in line
        assert not (run / ".hydra").exists() and not (run / "results.json").exists()  # nothing of the second run
    finally:
        holder.kill()
        holder.wait()
    res = cli("task=world", "world.n=1", f"hydra.run.dir={run}", cwd=tmp_path)  # the holder is gone: stale
    assert res.returncode == 0, res.stderr
    assert f"took over {run}" in res.stderr and f"pid {holder.pid}" in res.stderr
    assert (run / "results.json").is_file() and not (run / LOCK_NAME).exists()  # released at the end


def test_a_run_in_this_process_holds_the_folder_against_a_second(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert hold(run) is None
    try:
        res = cli("task=world", "world.n=1", f"hydra.run.dir={run}", cwd=tmp_path)
        one_line_error(res, f"pid {os.getpid()}")
        assert not (run / "results.json").exists()
    finally:
        release(run)
    assert not (run / LOCK_NAME).exists()


def test_a_pid_reused_by_another_process_is_not_a_holder(tmp_path):
    _plant_lock(tmp_path, os.getpid(), "1")  # this pid, but started at another time: the old holder is gone
    assert "is no longer running" in hold(tmp_path)
    release(tmp_path)


@pytest.mark.parametrize("where,expected", [("afile", "is an existing file, not a folder"),
                                            ("afile/sub", "cannot write into the run folder")])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, where, expected):
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("task=world", "world.n=1", f"hydra.run.dir={tmp_path / where}", cwd=tmp_path), expected)


def test_world_out_an_existing_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = cli("task=world", "world.n=1", f"world.out={tmp_path / 'afile'}", f"hydra.run.dir={tmp_path / 'r'}",
              cwd=tmp_path)
    one_line_error(res, "world.out folder")


def test_writes_outside_the_run_folder_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(tmp_path)
    with confined(run):
        save_json(run / "a" / "ok.json", {"x": 1})
        for bad in (tmp_path / "out.json", run / ".." / "out.json", run / "link" / "out.json", Path("/tmp/x.json")):
            with pytest.raises(DiffprobeError, match="outside the run folder"):
                save_json(bad, {"x": 1})
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["ok.json"]


@pytest.mark.parametrize("text", ["..", "../../x", "/etc/passwd", "a/b\\c", "nul\x00byte", ".hidden", "", " ",
                                  "x" * 5000, "héllo wörld", "C:\\temp\\x"])
def test_names_from_user_text_are_safe(tmp_path, text):
    name = safe_name(text)
    assert name and len(name) <= 80 and "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".") and name not in (".", "..")
    save_png(tmp_path / f"{name}_mask.png", np.zeros((2, 2), np.uint8))  # a real file of that name can be made
    assert (tmp_path / f"{name}_mask.png").resolve().parent == tmp_path.resolve()


def test_names_stay_distinct():
    assert len(set(unique_names(["a/b", "a_b", "A_B", "x" * 300, "x" * 301]))) == 5
    assert image_folders([Path("d/x.png"), Path("d/x.jpg"), Path("d/y.png"), Path("d/summary.json.png")]) == [
        "x_png", "x_jpg", "y", "summary_json"]


def _images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_a_folder_run_resumes_after_ctrl_c_and_survives_any_failure(tmp_path):
    from diffprobe.tasks.image_runs import process_images

    files = _images(tmp_path / "in", ["a.png", "b.png", "c.png", "x.png", "x.jpg"])
    out, calls = tmp_path / "run", []

    def process(path, image, name, fail=()):
        calls.append(path.name)
        if path.name in fail:
            raise fail[path.name]
        save_json(out / name / "record.json", {"width": image.width})
        return {"width": image.width}

    with pytest.raises(KeyboardInterrupt):
        process_images(files, lambda p, i, n: process(p, i, n, {"b.png": KeyboardInterrupt()}), out, "t", {"s": 1})
    summary = json.loads((out / "summary.json").read_text())  # written on the interrupt
    assert list(summary["images"]) == [str(files[0])] and summary["done"] == 1 and summary["total"] == 5
    calls.clear()
    with pytest.raises(DiffprobeError, match="1 of 5 images failed and were skipped"):
        process_images(files, lambda p, i, n: process(p, i, n, {"c.png": RuntimeError("boom")}), out, "t", {"s": 1})
    assert calls == ["b.png", "c.png", "x.png", "x.jpg"]  # a.png was done: not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {str(files[2]): "RuntimeError: boom"} and summary["done"] == 4
    assert summary["images"][str(files[3])]["dir"] == "x_png" and summary["images"][str(files[4])]["dir"] == "x_jpg"
    assert (out / "x_png" / "record.json").is_file() and (out / "x_jpg" / "record.json").is_file()
    calls.clear()
    process_images(files, process, out, "t", {"s": 1})  # the failed image is tried again
    assert calls == ["c.png"] and json.loads((out / "summary.json").read_text())["done"] == 5
    with pytest.raises(DiffprobeError, match="other settings"):
        process_images(files, process, out, "t", {"s": 2})


def test_an_image_too_large_to_read_is_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from diffprobe.data.images import load_image

    path = _images(tmp_path, ["big.png"])[0]
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 20 x 24 is then a decompression bomb
    with pytest.raises(DiffprobeError, match="too large to read safely"):
        load_image(path)


def test_json_outputs_are_strict(tmp_path):
    import torch

    save_json(tmp_path / "a.json", {"nan": float("nan"), "inf": np.float32("inf"), "arr": np.array([1.0, np.nan]),
                                    "t": torch.tensor([-np.inf, 2.0]), "ok": 1.5, "path": tmp_path})

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse)
    assert data == {"nan": None, "inf": None, "arr": [1.0, None], "t": [None, 2.0], "ok": 1.5, "path": str(tmp_path)}


def test_localize_word_files_stay_in_the_image_folder(tmp_path):
    import torch

    from diffprobe.heads.localize import Localization, LocalizeSettings
    from diffprobe.tasks.localize import write_localization

    words = ["../../escape", "/tmp/absolute", "a/b", "cat"]
    n = len(words)
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    result = Localization(words=words, raw=torch.rand(n, 8, 8), refined=torch.rand(n, 8, 8), masks=masks,
                          boxes=[[2, 2, 5, 5]] * n, components=[[[2, 2, 5, 5]]] * n)

    class Head:
        settings = LocalizeSettings(words=words, prompt="a cat")

    run = tmp_path / "run"
    with confined(run):
        write_localization(result, Head(), Path("img.png"), Image.new("RGB", (16, 16)), run / "img")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("run/img/") for w in written), written
    record = json.loads((run / "img" / "localization.json").read_text())
    assert [w["mask"] for w in record["words"]] == ["escape_mask.png", "tmp_absolute_mask.png", "a_b_mask.png",
                                                   "cat_mask.png"]
    assert record["size"] == {"width": 16, "height": 16}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_ctrl_c_in_a_folder_run_keeps_its_summary_and_a_rerun_does_only_the_rest(tmp_path):
    import signal

    n = 24   # enough that the run is still going when the signal lands, on a loaded machine too
    files = _images(tmp_path / "in", [f"img{k:02d}.png" for k in range(n)])
    out = tmp_path / "run"
    args = [sys.executable, "-m", "diffprobe", "task=diffseg", "model=tiny_sd15", f"image={tmp_path / 'in'}",
            "diffseg.anchors=8", f"hydra.run.dir={out}"]
    # a suite started in the background inherits an ignored SIGINT, and Python then keeps ignoring it: the run gets
    # the default disposition back, as a terminal's foreground process has
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(out / "img01" / "labels.png", proc)  # image 1 under way: image 0 is done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    done = summary["done"]
    assert 1 <= done < n and list(summary["images"]) == [str(f) for f in files[:done]]
    assert not (out / LOCK_NAME).exists()
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{done} of {n} items done" in again.stdout + again.stderr
    assert json.loads((out / "summary.json").read_text())["done"] == n


def test_a_killed_run_leaves_only_whole_files_and_its_folder_can_be_taken_over(tmp_path):
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "diffprobe", "task=world", "world.n=3000", f"hydra.run.dir={out}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "images" / "test_00000.png", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in out.rglob("*.png"):
        if not path.name.startswith("."):
            Image.open(path).load()  # every visible file is whole (the rest are hidden temporaries)
    res = cli("task=world", "world.n=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0 and "took over" in res.stderr, res.stderr[-2000:]


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from diffprobe.runfolder import make_run_dir

    def refuse(self, *args, **kwargs):  # a read-only folder (root, who runs CI, may write anywhere)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(DiffprobeError, match="cannot write into the run folder .*: Permission denied"):
        make_run_dir(tmp_path / "ro")
