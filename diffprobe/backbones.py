"""Backbones: the frozen parts a runner needs, loaded offline from a diffusers-layout directory or the HF cache,
or built as tiny random models of a supported structure for tests.

Every fact about a model (VAE scaling factor, latent size, token count, added conditioning) is read from its
configs, never hard-coded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffprobe.architectures import KINDS, TINY_TEXT_CONFIG, TINY_VAE_CONFIG, unet_config
from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Backbone:
    """A text-to-image latent diffusion model's parts, frozen (requires_grad False, eval mode)."""

    unet: Any
    vae: Any
    scheduler: Any
    kind: str  # the model family: a backend name of diffprobe.backends ("sd1", "sd2", "sdxl", "pixart", "sd3", ...)
    text_encoder: Any = None
    tokenizer: Any = None
    name: str = "custom"
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5
    tokenizer_3: Any = None
    attention_capture: str = "recompute"  # how the runner's captures get attention: "recompute" | "reuse"

    @property
    def family(self):
        """The diffprobe.backends entry of this model family (conditioning, sites, attention)."""
        from diffprobe.backends import backend_named

        return backend_named(self.kind)

    @property
    def probe(self):
        """The model's capture registry (built once; captures remove their hooks, so it is shared)."""
        from diffprobe.hooks import ProbeRegistry

        if getattr(self, "_probe", None) is None or self._probe.model is not self.unet:
            self._probe = ProbeRegistry(self.unet, self.family, self.family.text_tokens(self))
        return self._probe

    def check_image_size(self, size: int | None) -> int:
        """`size` if the model can take size x size images (a multiple of VAE factor x deepest divisor); None: the
        model's sample size."""
        if size is None:
            return self.sample_size
        size = int(size)
        deepest = self.grid_factor * max(s.divisor for s in self.probe.sites.values())
        if size < deepest or size % deepest:
            raise DiffprobeError(f"image_size must be a positive multiple of {deepest} for this model, not {size}")
        return size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """The VAE's shift factor (SD3, FLUX: latents are (z - shift) * scale), 0 for SD's VAEs."""
        return float(self.vae.config.get("shift_factor") or 0.0)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def grid_factor(self) -> int:
        """Image pixels per side of one unit of the grid that sites' divisors divide: the VAE factor, times 2 for
        FLUX, whose tokens are 2x2 latent patches."""
        return self.vae_factor * self.family.latent_per_token

    @property
    def sample_size(self) -> int:
        """Image side in pixels the denoiser was trained at (latent sample_size times the VAE factor)."""
        size = self.unet.config.get("sample_size") or self.family.default_sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size) * self.vae_factor

    @property
    def context_dim(self) -> int:
        """Width of the text states the denoiser takes (a transformer may project them: caption_channels)."""
        config = self.unet.config
        return int(config.get("caption_channels") or config.get("joint_attention_dim") or config.cross_attention_dim)

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def parts(self) -> dict[str, Any]:
        """The torch modules, by diffusers component name."""
        named = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3}
        return {k: v for k, v in named.items() if v is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        for module in self.parts().values():
            if dtype is not None and dtype != next(module.parameters()).dtype:
                module.to(device=device, dtype=dtype)
            elif device is not None:
                module.to(device=device)
        return self


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers' and diffusers' loading chatter (progress bars, dtype notices) inside the block,
    restoring their settings after: it is not the user's business and it buries diffprobe's own messages."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bar else lib.disable_progress_bar)()


def _freeze(backbone: Backbone) -> Backbone:
    for module in backbone.parts().values():
        module.eval().requires_grad_(False)
    return backbone


# -- tiny random models ------------------------------------------------------------------------------------


def word_tokenizer(words: list[str] = (), max_length: int = 77):
    """A CLIPTokenizer built offline: byte-level characters plus each of `words` as one token."""
    from transformers import CLIPTokenizer

    from diffprobe.mini.tokenizer import build_vocab

    vocab, merges = build_vocab(list(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _tiny_text_encoder(tokenizer, projection: bool = False, **sizes):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TINY_TEXT_CONFIG, **sizes},
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_sd3_text(tokenizer) -> dict:
    """SD3's three text encoders, tiny: two CLIPs with projections (8 + 8 wide: states padded to the joint
    width 32, pooled 16) and a T5 encoder 32 wide on the same vocabulary."""
    from transformers import T5Config, T5EncoderModel

    clip = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, projection_dim=8)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2))
    return dict(text_encoder=_tiny_text_encoder(tokenizer, projection=True, **clip), tokenizer=tokenizer,
                text_encoder_2=_tiny_text_encoder(tokenizer, projection=True, **clip), tokenizer_2=tokenizer,
                text_encoder_3=t5, tokenizer_3=tokenizer)


def _tiny_flux_text(tokenizer) -> dict:
    """FLUX's text encoders, tiny: CLIP 16 wide (the pooled projection) and a T5 encoder 32 wide (the joint width)."""
    from transformers import T5Config, T5EncoderModel

    clip = _tiny_text_encoder(tokenizer, hidden_size=16, intermediate_size=16, num_attention_heads=2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2))
    return dict(text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer)


def tiny_backbone(structure: str = "sd15", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  words: list[str] = ("cat", "dog", "bird", "car")) -> Backbone:
    """Random tiny model with the block structure of `structure` ("sd15", "sd21", "sdxl", "pixart", "sd3", "flux");
    64 px images."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from diffprobe.architectures import build_transformer

    torch.manual_seed(seed)
    kind = KINDS[structure]
    if kind in ("pixart", "sd3", "flux"):
        unet = build_transformer(structure, tiny=True)
    else:
        unet = UNet2DConditionModel(**unet_config(structure, tiny=True))
    if kind == "flux":
        unet.register_to_config(sample_size=8)   # FLUX's config has no sample size; its pipeline defaults to 128
    flow = kind in ("sd3", "flux")
    vae = AutoencoderKL(**TINY_VAE_CONFIG, **({"shift_factor": 0.1} if flow else {}))
    tokenizer = word_tokenizer(list(words))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        text = _tiny_sd3_text(tokenizer)
    elif kind == "flux":   # FLUX.1's scheduler settings; CLIP 16 wide (its pooled output), T5 as wide as the joint states
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15)
        text = _tiny_flux_text(tokenizer)
    else:
        text = dict(text_encoder=_tiny_text_encoder(tokenizer), tokenizer=tokenizer)
    if kind == "sdxl":
        text.update(text_encoder_2=_tiny_text_encoder(tokenizer, projection=True), tokenizer_2=tokenizer)
    bb = Backbone(unet=unet, vae=vae, scheduler=scheduler, kind=kind, name=f"tiny_{structure}", **text)
    return _freeze(bb.to(device, dtype))


# -- saving and loading in diffusers layout -------------------------------------------------------------------


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> Path:
    """Write `backbone` as a diffusers pipeline directory (model_index.json + one folder per part, safetensors)."""
    path = Path(path)
    backbone.family.pipeline(backbone).save_pretrained(path, safe_serialization=True)
    return path


HOW_TO_GET_WEIGHTS = (
    "To provide the weights, download them once on a machine with network access, e.g. `hf download {repo}` (it fills the "
    "Hugging Face cache, which diffprobe reads offline), or point `model.path=` at a local directory in diffusers "
    "layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, safetensors weights)."
)


def resolve_model_path(path: str | None, repo_id: str | None) -> Path:
    """The local directory of a model: `path` if given, else the HF cache snapshot of `repo_id`, offline.

    A relative `path` that does not exist from the working directory is tried relative to the directory that
    holds the installed `diffprobe` package, so `diffprobe/assets/mini` works from anywhere.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_absolute() and not p.exists():  # package data such as diffprobe/assets/mini, from any cwd
            installed = Path(__file__).resolve().parent.parent / p
            p = installed if installed.exists() else p
        if not any((p / f).is_file() for f in ("model_index.json", "unet/config.json", "transformer/config.json")):
            raise DiffprobeError(
                f"model path {p} is not a diffusers model directory (no model_index.json, unet/config.json or "
                "transformer/config.json there). "
                + HOW_TO_GET_WEIGHTS.format(repo=repo_id or "<repo id>")
            )
        return p
    if not repo_id:
        raise DiffprobeError("the model config names neither `path` nor `repo_id`; set model.path=/dir/of/weights")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise DiffprobeError(
            f"weights for {repo_id} are not in the Hugging Face cache ({cache}) and diffprobe never downloads. "
            + HOW_TO_GET_WEIGHTS.format(repo=repo_id)
        ) from None


def _model_index(root: Path) -> dict:
    path = root / "model_index.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise DiffprobeError(f"cannot read {path}: {exc}") from None


def _load_part(cls, root: Path, subfolder: str, dtype: torch.dtype):
    """`cls` from root/subfolder; refused when the folder's config names another class or weights are missing."""
    config = root / subfolder / "config.json"
    try:
        saved = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (OSError, ValueError) as exc:
        raise DiffprobeError(f"cannot read {config}: {exc}") from None
    if saved and saved != cls.__name__ and getattr(cls, "__module__", "").startswith("diffusers"):
        raise DiffprobeError(f"{root} names {cls.__name__} for {subfolder}/, but {config} describes a {saved}")
    try:
        part = cls.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype, local_files_only=True,
                                   use_safetensors=True)
    except (OSError, EnvironmentError, ValueError) as exc:
        raise DiffprobeError(
            f"cannot load {subfolder}/ from {root}: {str(exc).splitlines()[0]} (diffprobe loads safetensors weights only)"
        ) from None
    missing = [name for name, p in part.named_parameters() if p.is_meta]
    if missing:
        raise DiffprobeError(f"{root}/{subfolder} lacks weights {cls.__name__} needs ({len(missing)}, e.g. {missing[0]})")
    return part


def load_backbone(model_cfg: Any, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Backbone:
    """Load the model described by `model_cfg` (name, path, repo_id, tiny) on `device` in `dtype`, offline.

    `tiny` set (e.g. "sd15") builds a tiny random model of that structure instead of loading weights.
    """
    with quiet_libraries():
        return _load_backbone(model_cfg, device, dtype)


# classes a model_index.json may name for the text side (anything else is refused, never imported by name)
TEXT_CLASSES = {"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"}
TOKENIZER_CLASSES = {"CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast"}
DENOISER_CLASSES = {"UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                    "FluxTransformer2DModel"}
SCHEDULER_CLASSES = {"DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
                     "FlowMatchEulerDiscreteScheduler"}


def _index_name(index: dict, part: str, default: str | None = None) -> str | None:
    """The class name model_index.json gives `part` ([library, class] or null), or `default`."""
    return (index.get(part) or [None, default])[1]


def _named_class(index: dict, part: str, allowed: set[str], default: str, root: Path):
    """The class model_index.json names for `part` (default when it names none), from an allowlist."""
    import diffusers
    import transformers

    name = _index_name(index, part, default)
    if name not in allowed:
        raise DiffprobeError(f"{root}/model_index.json names {name} for {part}; diffprobe loads {', '.join(sorted(allowed))}")
    return getattr(diffusers, name, None) or getattr(transformers, name)


def _load_backbone(model_cfg: Any, device: str, dtype: str | torch.dtype) -> Backbone:
    """A model directory: unet/ or transformer/ beside vae/, text_encoder/, tokenizer/ and scheduler/; with
    `parts_from` set, every part but the denoiser comes from that directory (diffprobe-mini-dit uses mini's)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if get("tiny"):
        return tiny_backbone(get("tiny"), seed=int(get("seed", 0) or 0), device=device, dtype=torch_dtype)
    root = resolve_model_path(get("path"), get("repo_id"))
    parts = resolve_model_path(get("parts_from"), None) if get("parts_from") else root
    index = _model_index(root)
    parts_index = _model_index(parts)
    folder = "transformer" if (root / "transformer" / "config.json").is_file() else "unet"
    default = "PixArtTransformer2DModel" if folder == "transformer" else "UNet2DConditionModel"
    unet = _load_part(_named_class(index, folder, DENOISER_CLASSES, default, root), root, folder, torch_dtype)
    from diffprobe.backends import backend_for

    kind = backend_for(unet).name
    vae = _load_part(AutoencoderKL, parts, "vae", torch_dtype)
    text = {}
    for n in ("", "_2", "_3"):  # SDXL has a second CLIP encoder, SD3 a second and a T5
        if n and not _index_name(parts_index, f"text_encoder{n}") and not (n == "_2" and kind == "sdxl"):
            continue
        default_text = "CLIPTextModel" if not n else "CLIPTextModelWithProjection" if n == "_2" else "T5EncoderModel"
        cls = _named_class(parts_index, f"text_encoder{n}", TEXT_CLASSES, default_text, parts)
        text[f"text_encoder{n}"] = _load_part(cls, parts, f"text_encoder{n}", torch_dtype)
        try:
            default_tok = "T5TokenizerFast" if n == "_3" else "CLIPTokenizer"
            tok_cls = _named_class(parts_index, f"tokenizer{n}", TOKENIZER_CLASSES, default_tok, parts)
            text[f"tokenizer{n}"] = tok_cls.from_pretrained(parts, subfolder=f"tokenizer{n}", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DiffprobeError(f"cannot load tokenizer{n} from {parts}: {str(exc).splitlines()[0]}") from None
    sched_cls = _named_class(parts_index, "scheduler", SCHEDULER_CLASSES, "DDIMScheduler", parts)
    try:  # SD's DDPM-family schedules are read as DDIM (same betas); flow-matching ones as themselves
        sched_cls = sched_cls if sched_cls.__name__ == "FlowMatchEulerDiscreteScheduler" else DDIMScheduler
        scheduler = sched_cls.from_pretrained(parts, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DiffprobeError(f"cannot load the scheduler from {parts}: {str(exc).splitlines()[0]}") from None
    bb = Backbone(unet=unet, vae=vae, scheduler=scheduler, kind=kind, name=str(get("name", root.name)), **text)
    log.info("loaded %s (%s) from %s", bb.name, kind, root)
    return _freeze(bb.to(device))
