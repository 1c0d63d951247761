"""Making a Backbone: loaded offline from a diffusers-layout directory or the HF cache (the classes each part may
be are the model families' own), or built as a tiny random model of a family's structure for tests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from diffprobe.backbone import Backbone
from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers' and diffusers' loaders build parts under a process-wide default device ("meta"): two threads loading
# at once see each other's, so loads take turns
_LOADING = threading.Lock()


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


def family_of_structure(structure: str):
    """The registered family that has `structure` among its tiny configs."""
    from diffprobe.hooks.families import FAMILIES

    for family in FAMILIES:
        if structure in family.tiny_configs:
            return family
    known = ", ".join(s for f in FAMILIES for s in f.tiny_configs)
    raise DiffprobeError(f"unknown tiny model structure {structure!r}; known: {known}")


def build_denoiser(structure: str, tiny: bool = False, device: str = "cpu"):
    """A denoiser of `structure` ("sd15", "sdxl", "pixart", "sd35", ...) with random weights, from its family's
    published config (or tiny one); device="meta" allocates nothing."""
    return family_of_structure(structure).build(structure, tiny=tiny, device=device)


def tiny_backbone(structure: str = "sd15", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  words: list[str] = ("cat", "dog", "bird", "car")) -> Backbone:
    """Random tiny model of `structure` (any family's tiny structure: "sd15", "sd21", "sdxl", "pixart", "sd3",
    "sd35", "flux", ...); 64 px images."""
    family = family_of_structure(structure)
    torch.manual_seed(seed)
    bb = Backbone(family=family, name=f"tiny_{structure}", **family.tiny_parts(structure, list(words)))
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
    with _LOADING, quiet_libraries():
        bb = _load_backbone(model_cfg, device, dtype)
    warn_if_slow_half(bb.device, bb.dtype)
    get = _getter(model_cfg)
    bb.word_stream = str(get("word_stream") or "all")
    bb.streams_named(bb.word_stream)  # an unknown stream is refused here, before any work
    return bb


def half_is_slow(device: torch.device, dtype: torch.dtype) -> bool:
    """True for bfloat16 or float16 on a CPU without the instructions oneDNN needs for them (AVX512-BF16 / AMX /
    AVX512-FP16): there PyTorch's half convolutions fall back to a reference kernel, measured 500-1000x slower than
    float32 on a 2-core AVX2 machine (docs/scale.md)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    check = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
             else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    return not check()


def warn_if_slow_half(device: torch.device, dtype: torch.dtype) -> None:
    if half_is_slow(device, dtype):
        name = str(dtype).removeprefix("torch.")
        log.warning("this CPU has no %s instructions for oneDNN (AVX512-BF16, AMX or AVX512-FP16): %s convolutions "
                    "run hundreds of times slower than float32 here; use dtype=float32", name, name)


SCHEDULER_CLASSES = {"DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
                     "FlowMatchEulerDiscreteScheduler"}
"""Schedulers a model_index.json may name; the saved schedule is read into the family's own scheduler class."""


def _index_name(index: dict, part: str, default: str | None = None) -> str | None:
    """The class name model_index.json gives `part` ([library, class] or null), or `default`."""
    return (index.get(part) or [None, default])[1]


def _named_class(index: dict, part: str, allowed, default: str, root: Path):
    """The class model_index.json names for `part` (default when it names none), from an allowlist (never imported
    by any other name)."""
    import diffusers
    import transformers

    name = _index_name(index, part, default)
    if name not in allowed:
        raise DiffprobeError(f"{root}/model_index.json names {name} for {part}; diffprobe loads {', '.join(sorted(allowed))}")
    return getattr(diffusers, name, None) or getattr(transformers, name)


def _getter(model_cfg: Any):
    """`get(key, default)` over a model config given as a mapping or as a settings object."""
    return model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)


def _check_weights_fit(root: Path, parts: Path, folder: str, parts_index: dict, dtype: torch.dtype, name: str) -> None:
    """Refuse, before loading anything, a model whose weights (read from the safetensors headers of the parts
    model_index.json names) cannot fit in the memory available."""
    from diffprobe.memory import check_fits, loading_peak_bytes, rss_bytes, size_text

    loaded = [k for k, v in parts_index.items() if (k == "vae" or k.startswith("text_encoder")) and
              isinstance(v, list) and v[0] is not None]   # what diffprobe loads beside the denoiser (no safety checker)
    folders = [root / folder] + [parts / k for k in loaded + ([] if parts_index else ["vae"])]
    needed = loading_peak_bytes(folders, dtype)
    smaller = "" if torch.finfo(dtype).bits <= 16 else "load it in dtype=bfloat16 (or float16 on a GPU), or "
    check_fits(needed, f"loading the weights of {name} in {str(dtype).replace('torch.', '')}",
               f"{smaller}use a machine with more memory")
    estimate = rss_bytes() + needed
    log.info("peak memory estimate: %d bytes (%s: loading the weights)", estimate, size_text(estimate))


def _load_backbone(model_cfg: Any, device: str, dtype: str | torch.dtype) -> Backbone:
    """A model directory: unet/ or transformer/ beside vae/, the family's text encoders and tokenizers and
    scheduler/; with `parts_from` set, every part but the denoiser comes from that directory (diffprobe-mini-dit
    uses mini's)."""
    from diffusers import AutoencoderKL

    from diffprobe.hooks.families import FAMILIES, family_for

    get = _getter(model_cfg)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if get("tiny"):
        return tiny_backbone(get("tiny"), seed=int(get("seed", 0) or 0), device=device, dtype=torch_dtype)
    root = resolve_model_path(get("path"), get("repo_id"))
    parts = resolve_model_path(get("parts_from"), None) if get("parts_from") else root
    index = _model_index(root)
    parts_index = _model_index(parts)
    folder = "transformer" if (root / "transformer" / "config.json").is_file() else "unet"
    _check_weights_fit(root, parts, folder, parts_index, torch_dtype, str(get("name", root.name)))
    denoisers = [f.denoiser_class for f in FAMILIES if f.denoiser_folder == folder]
    unet = _load_part(_named_class(index, folder, set(denoisers), denoisers[0], root), root, folder, torch_dtype)
    family = family_for(unet)
    vae = _load_part(AutoencoderKL, parts, "vae", torch_dtype)
    text = {}
    for part in family.text_parts:
        encoder, tokenizer = f"text_encoder{part.slot}", f"tokenizer{part.slot}"
        if part.optional and not _index_name(parts_index, encoder):
            continue
        cls = _named_class(parts_index, encoder, set(part.encoders), part.encoders[0], parts)
        text[encoder] = _load_part(cls, parts, encoder, torch_dtype)
        try:
            tok_cls = _named_class(parts_index, tokenizer, set(part.tokenizers), part.tokenizers[0], parts)
            text[tokenizer] = tok_cls.from_pretrained(parts, subfolder=tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DiffprobeError(f"cannot load {tokenizer} from {parts}: {str(exc).splitlines()[0]}") from None
    _named_class(parts_index, "scheduler", SCHEDULER_CLASSES, family.scheduler_class, parts)
    try:
        import diffusers

        scheduler = getattr(diffusers, family.scheduler_class).from_pretrained(parts, subfolder="scheduler",
                                                                              local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DiffprobeError(f"cannot load the scheduler from {parts}: {str(exc).splitlines()[0]}") from None
    bb = Backbone(unet=unet, vae=vae, scheduler=scheduler, family=family, name=str(get("name", root.name)), **text)
    log.info("loaded %s (%s) from %s", bb.name, family.name, root)
    return _freeze(bb.to(device))
