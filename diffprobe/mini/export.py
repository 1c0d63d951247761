"""Write diffprobe-mini as a diffusers pipeline directory with its training record, loss curve and samples."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import torch

from diffprobe.data.world import render_scene, scene_seed
from diffprobe.io import save_figure, save_json, save_tensors


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def plot_losses(path: Path, losses: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.5))
    for ax, (name, values) in zip(np.atleast_1d(axes), losses.items()):
        v = np.asarray(values, dtype=np.float64)
        ax.plot(v, lw=0.5, alpha=0.35, label="per step")
        if len(v) >= 50:
            ax.plot(np.arange(49, len(v)), np.convolve(v, np.ones(50) / 50, mode="valid"), label="mean of 50")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    save_figure(path, fig)


@torch.no_grad()
def sample_grid(path: Path, generate, size: int, n: int, label: str = "mini") -> list[str]:
    """Generate from the captions of the first `n` test scenes with generate(captions) -> (n, H, W, 3) images
    in [0, 1]; save real (top) vs generated (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [render_scene(scene_seed("test", i), size) for i in range(n)]
    captions = [s.caption for s in scenes]
    out = generate(captions)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.6), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(scenes[j].image)
        axes[0, j].set_title("\n".join(textwrap.wrap(captions[j], 22)), fontsize=6)
        axes[1, j].imshow(np.clip(out[j], 0, 1))
        for ax in axes[:, j]:
            ax.axis("off")
    axes[0, 0].text(-8, size / 2, "world", rotation=90, va="center", fontsize=8)
    axes[1, 0].text(-8, size / 2, label, rotation=90, va="center", fontsize=8)
    save_figure(path, fig, dpi=130)
    return captions


SAMPLING = {"guidance": 4.0, "steps": 30}


def _replace_dir(out: Path, fill) -> Path:
    """Build the directory `out` beside it with fill(tmp), then swap it in whole."""
    out = Path(out)
    tmp, old = out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    fill(tmp)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _records(tmp: Path, record: dict, losses: dict[str, list[float]]) -> None:
    save_json(tmp / "training_config.json", record)
    save_json(tmp / "losses.json", losses)
    plot_losses(tmp / "loss_curve.png", losses)


def export_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler, record: dict,
                    losses: dict[str, list[float]], n_samples: int = 8, seed: int = 0) -> Path:
    """Save the pipeline (fp32 safetensors) plus training_config.json, losses.json, loss_curve.png and
    samples.png into `out`, replacing it whole: the new directory is built beside it, then renamed."""

    def fill(tmp: Path) -> None:
        pipe = build_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):  # the BPE source files beside transformers' tokenizer.json
            shutil.copy(Path(tokenizer.name_or_path) / name, tmp / "tokenizer" / name)
        _records(tmp, record, losses)
        if n_samples:
            size = unet.config.sample_size * pipe.vae_scale_factor

            def generate(captions):
                return pipe(captions, num_inference_steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance"],
                            height=size, width=size, generator=torch.Generator().manual_seed(seed),
                            output_type="np").images

            captions = sample_grid(tmp / "samples.png", generate, size, n_samples)
            save_json(tmp / "samples.json", {"captions": captions, **SAMPLING, "seed": seed})

    return _replace_dir(out, fill)


def export_transformer(out: Path, backbone, record: dict, losses: dict[str, list[float]], n_samples: int = 8,
                       seed: int = 0) -> Path:
    """Save diffprobe-mini-dit: transformer/ (weights stored as fp16 safetensors, loaded as fp32) and a
    model_index.json naming PixArt's pipeline; the VAE, text encoder, tokenizer and scheduler are mini's, read
    from the model config's `parts_from` when loading. Plus the records and samples of `export_pipeline`."""
    from diffprobe.drives import generate as generate_images

    def fill(tmp: Path) -> None:
        transformer = backbone.unet
        (tmp / "transformer").mkdir(parents=True)
        transformer.save_config(tmp / "transformer")
        save_tensors(tmp / "transformer" / "diffusion_pytorch_model.safetensors",
                     {k: v.to(torch.float16) for k, v in transformer.state_dict().items()}, metadata={"format": "pt"})
        save_json(tmp / "model_index.json", {"_class_name": "PixArtSigmaPipeline",
                                             "transformer": ["diffusers", type(transformer).__name__]})
        _records(tmp, record, losses)
        if n_samples:
            def generate(captions):
                images, _ = generate_images(backbone, captions, guidance=SAMPLING["guidance"],
                                            num_steps=SAMPLING["steps"], generator=torch.Generator().manual_seed(seed))
                return images.permute(0, 2, 3, 1).cpu().numpy()

            captions = sample_grid(tmp / "samples.png", generate, backbone.sample_size, n_samples, label="mini-dit")
            save_json(tmp / "samples.json", {"captions": captions, **SAMPLING, "seed": seed})

    return _replace_dir(out, fill)
