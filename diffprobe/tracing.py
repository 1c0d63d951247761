"""Word heat maps of a user's own diffusers pipeline over a whole generation (DAAM's `trace`, on every family).

    with diffprobe.trace(pipe) as tr:
        image = pipe("a red bird on a branch").images[0]
    heat = tr.word_map("bird")              # (H, W) at the image's size: DAAM's aggregation over the generation
    every = tr.word_maps()                  # {word: (H, W)} for each word of the prompt

Nothing of the pipeline is patched: the denoiser's cross-attention (a joint-attention block's image-to-text part on
SD3 and FLUX) is captured through diffprobe.hooks for every call the pipeline makes, averaged over the calls as
they happen (memory flat in the number of steps; `steps="all"` keeps each call for per-step maps), and every text
encoder's input ids are read by a forward pre-hook, so a word's columns are found in the tokens the pipeline itself
used. Hooks are removed on exit, also when the generation raises. The user's scheduler, guidance and step count are
the pipeline's own. With classifier-free guidance (a [negative; prompt] batch) only the prompt's rows are used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from diffprobe.backbone import Backbone
from diffprobe.concepts import ConceptAttention
from diffprobe.errors import DiffprobeError
from diffprobe.heads.heatmaps import daam_image_maps, daam_sites
from diffprobe.hooks import BatchLayout, Need, Reduce
from diffprobe.hooks.families import family_for


def pipeline_backbone(pipe) -> Backbone:
    """A Backbone over a diffusers pipeline's own parts (nothing copied or loaded)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise DiffprobeError(f"{type(pipe).__name__} has no unet or transformer to trace")
    parts = {k: getattr(pipe, k, None) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                   "text_encoder_3", "tokenizer_3")}
    return Backbone(unet=denoiser, vae=pipe.vae, scheduler=pipe.scheduler, family=family_for(denoiser),
                    name=type(pipe).__name__, **parts)


class Trace:
    """What one generation's cross-attention says about each word; see the module docstring. `steps`: "mean"
    (DAAM's sum over the calls, kept as a running mean) or "all" (every call kept: `maps(steps=...)`)."""

    def __init__(self, pipe, sites: str | Sequence[str] | None = None, steps: str = "mean",
                 concepts: Sequence[str] | None = None, **concept_options):
        if steps not in ("mean", "all"):
            raise DiffprobeError(f"steps must be 'mean' or 'all', not {steps!r}")
        self.pipe, self.bb = pipe, pipeline_backbone(pipe)
        self.concepts = ConceptAttention(self.bb, concepts, **concept_options) if concepts else None
        probe = self.bb.probe
        self.names = probe.select(sites) if sites is not None else daam_sites(probe.sites)
        if not self.names:
            raise DiffprobeError(f"{self.bb.name}: no cross-attention site to trace")
        self.need = Need(self.names, Reduce(heads="none", steps=steps), layout=BatchLayout(keep="both"))
        self.ids: dict[str, list[torch.Tensor]] = defaultdict(list)   # encoder attribute -> input ids per call
        self._handles, self._capture, self.cache = [], None, None

    def __enter__(self) -> "Trace":
        for s in self.bb.text_streams:
            encoder = getattr(self.pipe, s.tokenizer.replace("tokenizer", "text_encoder"), None)
            if encoder is not None:
                self._handles.append(encoder.register_forward_pre_hook(self._keep_ids(s.tokenizer), with_kwargs=True))
        self._capture = self.bb.probe.capture(self.need)
        self.cache = self._capture.__enter__()
        if self.concepts is not None:
            self.concepts.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.concepts is not None:
            self.concepts.__exit__(*exc)
        return bool(self._capture.__exit__(*exc))

    def _keep_ids(self, tokenizer: str):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.ids[tokenizer].append(ids.detach().cpu())
        return hook

    # -- what the generation was ------------------------------------------------------------------------------

    def _stream_ids(self) -> dict:
        """{TextStream: (P, L) input ids of the prompts} of every stream a word's map reads: each encoder's first
        call in the generation (pipelines encode the prompt before the negative prompt)."""
        seen = {s: self.ids[s.tokenizer][0] for s in self.bb.streams_named(self.bb.word_stream)
                if self.ids.get(s.tokenizer)}
        if not seen:
            raise DiffprobeError("the trace saw no prompt tokens: give the pipeline a prompt (not prompt_embeds) "
                                 "inside the `with` block")
        return seen

    def _guided(self) -> bool:
        """Whether the denoiser's batch was [negative; prompt]: the pipeline's own flag, or (PixArt, which decides
        inside its call) whether it encoded a negative prompt."""
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if flag is not None:
            return bool(flag)
        return len(self.ids.get(self.bb.text_streams[0].tokenizer, [])) >= 2

    def _rows(self, batch: int) -> slice:
        return slice(batch // 2, batch) if self._guided() else slice(0, batch)

    def prompt_of(self, image: int) -> tuple[int, str]:
        """(prompt number, prompt text as its first stream's tokenizer decodes it) of generated image `image`
        (pipelines repeat each prompt num_images_per_prompt times, prompt by prompt)."""
        stream, rows = next(iter(self._stream_ids().items()))
        batch = self.cache[self.names[0]].shape[1 if self.need.reduce.stacks_steps else 0]
        sl = self._rows(batch)
        images = sl.stop - sl.start
        if not 0 <= image < images:
            raise DiffprobeError(f"image {image} is not one of the {images} generated")
        number = image // max(1, images // rows.shape[0])
        tokenizer = getattr(self.bb, stream.tokenizer)
        return number, tokenizer.decode(rows[number], skip_special_tokens=True)

    def columns(self, word: str, image: int = 0) -> list[int]:
        """The context columns of `word`'s tokens in image `image`'s prompt, in every text stream the pipeline fed
        the denoiser (the backbone's word rule, on the ids the pipeline used); a word of several tokens has
        several columns."""
        number, prompt = self.prompt_of(image)
        ids = {s: rows[number].tolist() for s, rows in self._stream_ids().items()}
        return self.bb.word_columns(ids, [word], prompt)[0]

    # -- maps ---------------------------------------------------------------------------------------------------

    def layers(self, image: int = 0, steps=None, layers=None) -> list[tuple[int, tuple[int, int], torch.Tensor]]:
        """[(divisor, grid, (heads, Q, T))] of the traced sites (or the sites `layers` selects among them) for image
        `image`: the mean over the calls, or over the calls `steps` (indices; needs steps="all")."""
        names = self.names if layers is None else [n for n in self.bb.probe.select(layers) if n in self.names]
        if not names:
            raise DiffprobeError(f"no traced site matches {layers!r}")
        out = []
        for name in names:
            maps = self.cache[name]                                  # (B, heads, Q, T) or (S, B, heads, Q, T)
            if self.need.reduce.stacks_steps:
                maps = maps[list(steps) if steps is not None else slice(None)].mean(0)
            elif steps is not None:
                raise DiffprobeError("per-step maps need diffprobe.trace(pipe, steps='all')")
            out.append((self.bb.probe.sites[name].divisor, self.cache.grid(name), maps[self._rows(maps.shape[0])][image]))
        return out

    def word_map(self, word: str, image: int = 0, steps=None, layers=None) -> torch.Tensor:
        """(H, W) heat map of `word` in generated image `image`, DAAM's: every (layer, head) map upsampled
        bicubically to the finest kept grid, clamped at 0 and averaged, a word the mean of its tokens' maps; then
        bicubically to the image's size and clamped at 0 (DAAM's expand_image); not normalised. `steps`, `layers`:
        per-step and per-layer slices."""
        columns = self.columns(word, image)   # checks the image number too
        return daam_image_maps(self.layers(image, steps, layers), [columns], self.bb.grid_factor)[0]

    def word_maps(self, words: Sequence[str] | None = None, image: int = 0, **kwargs) -> dict[str, torch.Tensor]:
        """{word: (H, W)} for `words` (default: every word of the image's prompt, split on spaces)."""
        return {w: self.word_map(w, image, **kwargs) for w in (words or self.prompt_of(image)[1].split())}

    def concept_maps(self, image: int = 0) -> dict[str, torch.Tensor]:
        """{concept: (H, W)} for generated image `image`: ConceptAttention's maps (diffprobe.concepts) of the concepts
        given to diffprobe.trace(pipe, concepts=[...]), resized bilinearly to the image's size; at each pixel they
        sum to 1 over the concepts."""
        if self.concepts is None:
            raise DiffprobeError("no concepts were traced: diffprobe.trace(pipe, concepts=['bird', 'sky', ...])")
        maps = self.concepts.image_maps(self.concepts.image_size(self.bb.grid_factor))
        maps = maps[self._rows(maps.shape[0])]
        if not 0 <= image < maps.shape[0]:
            raise DiffprobeError(f"image {image} is not one of the {maps.shape[0]} generated")
        return dict(zip(self.concepts.concepts, maps[image]))

    @property
    def calls(self) -> int:
        """Denoiser calls seen (the generation's steps)."""
        return len(self.cache.timesteps)
