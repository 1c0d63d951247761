"""Every family at its published size, loaded as a user loads it: seconds per image, peak memory and
diffprobe.memory's estimate per task and dtype.

Each denoiser is built at its published configuration with random weights (SD 1.5 and 2.1 UNets, the SDXL UNet,
PixArt-alpha, the SD3-medium transformer; FLUX.1 at its real widths with 2 double- and 4 single-stream blocks
instead of 19 and 38), beside the published VAE of its family and text encoders of the published widths but one
layer deep (their cost is not what is measured). The parts are saved in the diffusers layout to a work folder, and
every task then runs as a user runs it, in its own process:

    python -m diffprobe task=<task> model=<family> model.path=<folder> dtype=<dtype> image=<native-size image> ...

Tasks: diffseg, localize, probe, analyze (diffseg + localize + probe in one pass), a 2-step keypoint fit (one image
per step), one-step hyperfeature extraction (an untrained aggregator: weights do not change the cost), each over a
folder of two images, and too_big: every attention map at 4x the native side, which must be refused before the model
runs. Two images, because the first image's VAE encoding runs before the denoiser's mapped weights are read from
disk: a one-image run can peak below what every later image of a folder needs (the estimate is of that steady state).
Recorded per (family, dtype, task): the process's peak RSS (the kernel's count for that child), the seconds from
the model being loaded to the process's end per image, and the largest "peak memory estimate" the run logged
(diffprobe's estimate before each pass: memory in use + the pass's dry-run activations + captures + head work).
Results go to a JSON file as each run ends; rerunning skips what it holds (resumable), and --table prints the
markdown table of docs/scale.md from it.

    python benchmarks/real_size.py [--families sd15 sdxl ...] [--dtypes float32 bfloat16] [--tasks diffseg ...]
                                   [--work DIR] [--results benchmarks/results/real_size.json] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
SD3_VAE = dict(SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)


def _clip(tokenizer: str, width: int, projection: bool = False):
    def make(parts):
        from diffprobe.families import tiny

        return tiny.clip_encoder(parts[tokenizer], projection, hidden_size=width, num_attention_heads=width // 64,
                                 projection_dim=width, intermediate_size=64, num_hidden_layers=1)
    return make


def _t5(tokenizer: str, width: int = 4096):
    def make(parts):
        from diffprobe.families import tiny

        return tiny.t5_encoder(parts[tokenizer], width)
    return make


# family -> (structure, published config overrides, VAE config, native pixels, text encoders by part)
FAMILIES = {
    "sd15": ("sd15", {}, dict(SD_VAE, sample_size=512), 512, {"text_encoder": _clip("tokenizer", 768)}),
    "sd21": ("sd21", {}, dict(SD_VAE, sample_size=768), 768, {"text_encoder": _clip("tokenizer", 1024)}),
    "sdxl": ("sdxl", {}, dict(SD_VAE, sample_size=1024, scaling_factor=0.13025), 1024,
             {"text_encoder": _clip("tokenizer", 768), "text_encoder_2": _clip("tokenizer_2", 1280, True)}),
    "pixart": ("pixart", {}, dict(SD_VAE, sample_size=1024), 1024, {"text_encoder": _t5("tokenizer")}),
    "sd3": ("sd3", {}, dict(SD3_VAE, sample_size=1024), 1024,
            {"text_encoder": _clip("tokenizer", 768, True), "text_encoder_2": _clip("tokenizer_2", 1280, True),
             "text_encoder_3": _t5("tokenizer_3")}),
    "flux": ("flux", {"num_layers": 2, "num_single_layers": 4}, dict(FLUX_VAE, sample_size=1024), 1024,
             {"text_encoder": _clip("tokenizer", 768), "text_encoder_2": _t5("tokenizer_2")}),
}
WORDS = ["cat", "dog", "photo"]
LOCALIZE = ["localize.words=[cat]", "localize.prompt=a photo of a cat"]
TASKS = {   # the task's arguments; {image}, {images}, {weights} are filled in
    "diffseg": ["task=diffseg", "image={images}"],
    "localize": ["task=localize", "image={images}", *LOCALIZE],
    "probe": ["task=probe", "image={images}"],
    "analyze": ["task=analyze", "image={images}", "analyze.tasks=[diffseg,localize,probe]", *LOCALIZE],
    "keypoints": ["task=keypoints", "mode=fit", "data={images}", "keypoints.fit.steps=2",
                  "keypoints.fit.batch_size=1", "keypoints.fit.num_indices=2", "keypoints.fit.select_batch=1",
                  "keypoints.preview=0"],
    "hyperfeatures": ["task=hyperfeatures", "mode=extract", "weights={weights}", "image={images}",
                      "hyperfeatures.process=one_step"],
    # every attention map at 4x the native side (SD3: 3x, its largest): must be refused before the model runs
    "too_big": ["task=probe", "image={image}", "probe.sites=[*.hook_probs]", "probe.image_size={big}"],
}
TOO_BIG = {"sd3": 3}   # the too_big side in native sides: SD3's position table reaches 3072 px (4096 is refused as such)
ESTIMATE = re.compile(r"peak memory estimate: (\d+) bytes")
LOADED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]\[diffprobe\.loading\]\[INFO\] - loaded ", re.M)


def build_model(family: str, folder: Path) -> None:
    """Save `family` at its published size, with random weights, to `folder` in the diffusers layout (written to a
    temporary folder, then renamed: whole or absent)."""
    import diffusers
    import torch

    from diffprobe.backbone import Backbone
    from diffprobe.loading import family_of_structure, save_backbone

    structure, overrides, vae, native, encoders = FAMILIES[family]
    record = family_of_structure(structure)
    torch.manual_seed(0)
    parts = record.tiny_parts(structure, WORDS)   # the tokenizers and scheduler; the rest is replaced
    parts["unet"] = getattr(diffusers, record.denoiser_class)(**{**record.configs[structure], **overrides})
    if family == "flux":
        parts["unet"].register_to_config(sample_size=native // 16)
    parts["vae"] = diffusers.AutoencoderKL(**vae)
    for part, make in encoders.items():
        parts[part] = make(parts)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_backbone(Backbone(family=record, name=family, **parts), tmp)
    tmp.rename(folder)


def build_weights(family: str, model: Path, folder: Path) -> None:
    """An untrained hyperfeature aggregator for the family's default layers, one-step extraction at its native
    size (the weights do not change the cost measured)."""
    from diffprobe.heads.hyperfeatures.extract import AUTO, ExtractionSettings
    from diffprobe.heads.hyperfeatures.model import HyperfeatureModel
    from diffprobe.loading import load_backbone

    native = FAMILIES[family][3]
    bb = load_backbone({"path": str(model)}, dtype="bfloat16")
    extraction = ExtractionSettings(layers=[AUTO], process="one_step", image_size=native)
    HyperfeatureModel.build(bb.probe.sites, extraction, output_size=native // 8).save(folder)


def make_images(folder: Path, size: int) -> list[Path]:
    """Two native-size pictures of coloured shapes."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (back, fore) in enumerate([((90, 140, 200), (220, 120, 40)), ((60, 160, 80), (200, 60, 160))]):
        image = Image.new("RGB", (size, size), back)
        draw = ImageDraw.Draw(image)
        draw.ellipse([size // 5 + 40 * i, size // 4, size // 2 + 40 * i, size * 3 // 4], fill=fore)
        draw.rectangle([size * 3 // 5, size // 5, size * 9 // 10, size // 2], fill=(240, 230, 200))
        paths.append(folder / f"scene{i}.png")
        image.save(paths[-1])
    return paths


def run_task(family: str, dtype: str, task: str, model: Path, images: list[Path], weights: Path,
             run_dir: Path) -> dict:
    """One task in its own process; its peak RSS, seconds per image after loading, and the estimate it logged.

    The peak is the child's ru_maxrss from wait4. Linux carries a process's high-water RSS across exec, so a
    child forked from a large process reports at least that process's size: this process never loads a model
    (building happens in children of its own), so its children's peaks are their own."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    big = TOO_BIG.get(family, 4) * FAMILIES[family][3]
    args = [a.format(image=images[0], images=images[0].parent, weights=weights, big=big) for a in TASKS[task]]
    cmd = [sys.executable, "-m", "diffprobe", *args, f"model={family}", f"model.path={model}", f"dtype={dtype}",
           f"hydra.run.dir={run_dir}"]
    start = time.time()
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": text.strip().splitlines()[-1] if text.strip() else f"exit {status}",
                "exit": os.waitstatus_to_exitcode(status), "seconds_total": end - start,
                "peak_rss": usage.ru_maxrss * 1024, "load": os.getloadavg()[0]}
    loaded = LOADED.search(text)
    since = (time.mktime(time.strptime(loaded.group(1)[:19], "%Y-%m-%d %H:%M:%S")) if loaded else start)
    per_image = 1 if task == "too_big" else len(images)
    estimates = [int(m) for m in ESTIMATE.findall(text)]
    return {"seconds_per_image": (end - since) / per_image, "seconds_total": end - start,
            "peak_rss": usage.ru_maxrss * 1024, "estimate": max(estimates) if estimates else None,
            "images": per_image, "load": os.getloadavg()[0]}


def table(results: dict) -> str:
    lines = ["| family | dtype | task | images | s / image | peak RSS (GiB) | estimate (GiB) | estimate / peak | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        family, dtype, task = key.split("/")
        images = r.get("images", 2 if task == "keypoints" else 1)   # results from before image tasks took two
        if "error" in r:
            lines.append(f"| {family} | {dtype} | {task} | {images} | exit {r.get('exit')} after "
                         f"{r.get('seconds_total', 0):.0f} s: `{r['error']}` | {r.get('peak_rss', 0) / 2**30:.2f} | | | "
                         f"{r.get('load', 0):.1f} |")
            continue
        est = r["estimate"]
        ratio = f"{est / r['peak_rss']:.2f}" if est else "n/a"
        lines.append(f"| {family} | {dtype} | {task} | {images} | {r['seconds_per_image']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
                     f"{est / 2**30 if est else float('nan'):.2f} | {ratio} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffprobe_real_size"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "real_size.json")
    parser.add_argument("--keep", action="store_true", help="keep each family's saved model after its runs")
    parser.add_argument("--table", action="store_true", help="print the table of the results file and stop")
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--build-weights", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_model(args.build[0], Path(args.build[1]))
    if args.build_weights:
        return build_weights(args.build_weights[0], Path(args.build_weights[1]), Path(args.build_weights[2]))
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if args.table:
        print(table(results))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for family in args.families:
        todo = [(d, t) for d in args.dtypes for t in args.tasks if f"{family}/{d}/{t}" not in results]
        if not todo:
            continue
        model, weights = args.work / family, args.work / f"{family}_aggregator"
        if not model.is_dir():   # built in a child: this process stays small (see run_task)
            print(f"building {family} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--build", family, str(model)], check=True)
        if any(t == "hyperfeatures" for _, t in todo) and not weights.is_dir():
            subprocess.run([sys.executable, __file__, "--build-weights", family, str(model), str(weights)], check=True)
        images = make_images(args.work / f"images_{FAMILIES[family][3]}", FAMILIES[family][3])
        for dtype, task in todo:
            print(f"{family} {dtype} {task} ...", file=sys.stderr, flush=True)
            results[f"{family}/{dtype}/{task}"] = run_task(family, dtype, task, model, images, weights,
                                                           args.work / "runs" / f"{family}-{dtype}-{task}")
            args.results.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.results.with_suffix(".partial")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.results)
            print(f"  {results[f'{family}/{dtype}/{task}']}", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(model)
    print(table(results))


if __name__ == "__main__":
    main()
