"""Heads declare, one runner captures.

A head states a `Plan` from site metadata alone (how the denoiser is driven, which sites with which
reductions, its conditioning), may consume each denoiser call as it happens (`on_call`), and turns its
`View` of the capture into a result with pure tensor code (`finish`). The runner owns the registry and the
denoiser calls: plans whose drives are equal share one pass; plans that also share their input images and
conditioning share their batch rows (so a site two heads want is computed once); every other plan gets its
own rows of the same batch; the union of all needs is captured once, with early exit when nothing needs the
model's output.

    views = run_plans(bb, [head_a.plan(bb.probe.sites), head_b.plan(bb.probe.sites)], [x, x])
    results = run_heads(bb, [head_a, head_b], item)          # the same, from the heads themselves
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch

from diffprobe.families import Conditioning
from diffprobe.drives import Drive, decode_latents, encode_images, encode_prompt, run_drive, unet_call
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import ActivationCache, Need, Site
from diffprobe.memory import check_fits, forward_peak_bytes, resident_when_weights_read, rss_bytes, size_text

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One unit of a run: `key` a stable id (a file path, a dataset index), `image` the PIL image (None for
    generation), `data` whatever the task passes along (ground truth, the wanted output size, ...)."""

    key: str
    image: Any = None
    data: dict = field(default_factory=dict)


@dataclass
class Plan:
    """What a head asks of one pass.

    drive: how the denoiser is driven (equal drives share calls). needs: what to capture (their `rows` are
    set by the runner). prompt: the text conditioning of every row, or a tuple of one prompt per row (a
    generation drive makes one image per prompt); context: a learned (T, D) context fed straight to
    cross-attention instead (keypoints). size: image (H, W) for generation drives and size-aware
    conditioning (default: the model's sample size). work: bytes the head's own computation holds for a
    latent of (h, w) beside the captured tensors (checked with them before the pass starts; run_heads sets it from
    Head.work). batch: at most this
    many of the plan's rows per denoiser call: more rows run as successive passes of their own, drawing on from one
    generator, and their views are joined (memory for speed; the result is the one batch's). watch: read-only hooks
    of the head's own around the pass, watch(bb) -> a context manager (concept maps: diffprobe.concepts); what it
    enters as is view.state["watch"], and view.state["rows"] the plan's rows of the pass's batch (a slice). start: a
    generation's starting latents (B, C, h, w) (an inversion's, to regenerate a real image; default: drawn from the
    generator); a plan with them runs alone.
    """

    drive: Drive
    needs: tuple[Need, ...]
    prompt: str | tuple[str, ...] = ""
    context: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    work: Callable[[tuple[int, int]], int] | None = None
    batch: int | None = None
    watch: Callable | None = None
    start: torch.Tensor | None = None

    def conditioning_key(self) -> tuple:
        return ("context", id(self.context)) if self.context is not None else ("prompt", self.prompt)


class View:
    """One plan's part of a pass: the caches of its needs, its rows only.

    view[name] -> the captured tensor (B, ...) of a site; view.maps / grid / key_grid / stack as
    ActivationCache; view.timesteps; view.images: the generated images (B, 3, H, W) of a generation drive.
    During `on_call`, view[name] is that call's tensor. view.state: a dict that lives for one pass of one plan,
    the same in every `on_call` and in `finish` (where a streaming head accumulates, so the head itself holds
    nothing between items).
    """

    def __init__(self, caches: Sequence[ActivationCache], images: torch.Tensor | None = None, current: bool = False,
                 state: dict | None = None):
        self.caches, self.images, self.current = list(caches), images, current
        self.state = {} if state is None else state

    @classmethod
    def from_tensors(cls, sites: Mapping[str, Site], tensors: Mapping[str, torch.Tensor], **kwargs) -> "View":
        """A view of given tensors (no model): for testing a head; kwargs as ActivationCache.from_tensors."""
        return cls([ActivationCache.from_tensors(sites, tensors, **kwargs)])

    @classmethod
    def join(cls, views: Sequence["View"]) -> "View":
        """One view of the rows of several passes of one plan, in order (captures that keep one step per site)."""
        caches = []
        for parts in zip(*(v.caches for v in views)):
            first = parts[0]
            if first.reduce.stacks_steps:
                raise DiffprobeError("a plan that keeps several steps per site cannot split its rows (Plan.batch)")
            tensors = {n: torch.cat([p[n] for p in parts]) for n in first.names}
            caches.append(ActivationCache.from_tensors(first.sites, tensors, grids={n: first.grid(n) for n in tensors},
                                                       timesteps=first.timesteps, reduce=first.reduce))
        images = None if views[0].images is None else torch.cat([v.images for v in views])
        return cls(caches, images=images)

    def _cache(self, name: str) -> ActivationCache:
        for cache in self.caches:
            if name in cache.sites:
                return cache
        raise KeyError(f"{name!r} is not a site of this view")

    def __getitem__(self, name: str) -> torch.Tensor:
        cache = self._cache(name)
        return cache.current[name] if self.current else cache[name]

    def __contains__(self, name: str) -> bool:
        return any(name in c for c in self.caches)

    @property
    def names(self) -> list[str]:
        return [n for c in self.caches for n in c.names]

    @property
    def sites(self) -> dict[str, Site]:
        return {n: s for c in self.caches for n, s in c.sites.items()}

    @property
    def timesteps(self) -> list[float]:
        return self.caches[0].timesteps

    def grid(self, name: str) -> tuple[int, int]:
        return self._cache(name).grid(name)

    def key_grid(self, name: str) -> tuple[int, int]:
        return self._cache(name).key_grid(name)

    def maps(self, name: str, size=None) -> torch.Tensor:
        return self._cache(name).maps(name, size)

    def stack(self, names: Sequence[str], size) -> torch.Tensor:
        return torch.stack([self.maps(n, size) for n in names])


class Head:
    """Base of the heads: `plan` from site metadata, optional `on_call` streaming, `finish` from a View.

    `inputs(item)` gives the (B, 3, H, W) images in [-1, 1] a head wants for an item (None for generation);
    `draws(x)` the generator its latents and noise are drawn from for those inputs, when its result must not
    depend on the pass it joins (None: the pass's generator). A head keeps nothing between calls: what `finish`
    needs comes from the plan's sites, the item, or the view (view.state for what `on_call` gathered).
    """

    name = "head"

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        raise NotImplementedError

    def inputs(self, item: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def draws(self, x: torch.Tensor | None) -> torch.Generator | None:
        return None

    def work(self, sites: Mapping[str, Site], latent_hw: tuple[int, int], item: Any) -> int:
        """Bytes `finish` holds for `item` beside the captured tensors, for a latent of (h, w): checked with the
        captures before the pass starts (run_heads makes it the plan's `work`)."""
        return 0

    def on_call(self, call: int, t: float, view: View) -> None:
        """Called after every denoiser call with that call's tensors (streaming consumers override it)."""

    def finish(self, view: View, item: Any) -> Any:
        """The head's result for `item` from its view of the pass (pure tensor code)."""
        return view


def _same_images(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _conditioning(bb, plan: Plan, rows: int, size: tuple[int, int]) -> Conditioning:
    if plan.context is not None:
        return bb.family.context_conditioning(bb, plan.context, rows, size)
    if isinstance(plan.prompt, tuple):
        if len(plan.prompt) != rows:
            raise DiffprobeError(f"a plan with {len(plan.prompt)} prompts has {rows} rows of images")
        return encode_prompt(bb, list(plan.prompt), size)
    return encode_prompt(bb, [plan.prompt], size).expand(rows)


def _rows(plan: Plan, images: torch.Tensor | None) -> int:
    """Batch rows of a plan: one per image, or one per prompt of a generation."""
    if images is not None:
        return images.shape[0]
    return len(plan.prompt) if isinstance(plan.prompt, tuple) else 1


def _fork(generator: torch.Generator | None) -> torch.Generator | None:
    """A copy of `generator` in its current state: every block of a pass draws what it would draw alone."""
    if generator is None:
        return None
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


def run_plans(bb, plans: Sequence[Plan], images: Sequence[torch.Tensor | None],
              generator: torch.Generator | None = None, on_call: Sequence | None = None,
              progress: bool = False, draws: Sequence[torch.Generator | None] | None = None) -> list[View]:
    """One pass of the denoiser for plans with equal drives; returns one View per plan.

    images[i]: the (B_i, 3, H, W) images of plan i in [-1, 1] (None for generation). Plans with equal
    images and conditioning share their rows; the others get their own rows of one batch. Latents (and
    the noise of a noisy one-step drive) are drawn per distinct image set from a copy of `generator`, so
    each plan sees what it would see in a pass of its own; draws[i], when given and not None, is plan i's own
    generator instead. on_call[i]: fn(call, t, View) for plan i, or None.
    """
    if not plans:
        return []
    drive = plans[0].drive
    if any(p.drive != drive for p in plans):
        raise DiffprobeError("run_plans needs plans with equal drives; group them first (run_heads does)")
    size = plans[0].size or (bb.sample_size, bb.sample_size)
    own = list(draws) if draws is not None else [None] * len(plans)
    blocks: list[tuple[torch.Tensor | None, tuple, int]] = []  # (images, conditioning and draws key, first plan)
    block_of = []
    for i, (plan, x) in enumerate(zip(plans, images)):
        key = (plan.conditioning_key(), id(own[i]))
        found = next((b for b, (bx, bk, _) in enumerate(blocks) if bk == key and _same_images(bx, x)), None)
        if found is None:
            blocks.append((x, key, i))
            found = len(blocks) - 1
        block_of.append(found)
    counts = [_rows(plans[first], x) for x, _, first in blocks]
    starts = [sum(counts[:b]) for b in range(len(blocks))]
    conds = [_conditioning(bb, plans[first], n, size) for (_, _, first), n in zip(blocks, counts)]
    pixels = blocks[0][0].shape[-2:] if blocks[0][0] is not None else size
    latent_hw = (pixels[0] // bb.grid_factor, pixels[1] // bb.grid_factor)   # the units of the sites' divisors
    cfg = drive.process == "generation" and bb.family.classifier_free
    offset = sum(counts) if cfg else 0  # classifier-free generation: [uncond x P; cond x P]
    needs = [[replace(n, rows=(offset + starts[b], offset + starts[b] + counts[b])) for n in p.needs]
             for p, b in zip(plans, block_of)]
    flat = [n for group in needs for n in group]
    rows = sum(counts) * (2 if cfg else 1)
    grad = any(n.grad for n in flat) and torch.is_grad_enabled()
    early = drive.process == "one_step"   # the capture below stops the call once its sites have fired
    # a fit's dry run runs its capture: the graph it keeps for the backward is most of its peak (without gradients
    # the capture holds one chunk at a time, and its per-head loops over fake tensors would take minutes at large sizes)
    dry_capture = tuple(flat) if early and grad else ()
    activations, new_shape = pass_activation_bytes(bb, drive.process, rows, max(counts), latent_hw, conds[0], grad,
                                                   dry_capture)
    check_pass_fits(bb, plans, flat, latent_hw, conds[0].context.shape[1], activations, new_shape=new_shape,
                    captured=bool(dry_capture))
    latents, noise = None, None
    if drive.process == "generation":  # each plan's rows are its cond rows, after the unconditional ones with CFG
        uncond = [encode_prompt(bb, [""], size).expand(sum(counts))] if cfg else []
        cond = Conditioning.cat(uncond + conds)
        if any(p.start is not None for p in plans):
            if len(plans) != 1:
                raise DiffprobeError("a generation from given latents (Plan.start) runs alone")
            latents = plans[0].start
    else:
        cond = Conditioning.cat(conds)
        encoded: list[tuple[torch.Tensor, object, tuple]] = []  # blocks with equal images and generator (other
        drawn, advanced = [], None                              # prompts) encode once: their draws agree
        for x, _, first in blocks:
            source = own[first] or generator
            hit = next((d for ex, src, d in encoded if src is source and _same_images(ex, x)), None)
            if hit is None:
                hit = _block_inputs(bb, drive, x, source)
                encoded.append((x, source, hit))
            drawn.append(hit)
            advanced = hit[2] if advanced is None and own[first] is None else advanced
        latents = torch.cat([d[0] for d in drawn])
        noise = torch.cat([d[1] for d in drawn]) if drive.noise and drive.process == "one_step" else None
        if generator is not None and advanced is not None:  # advance as one block's draws from it would
            generator.set_state(advanced.get_state())
    bounds = [sum(len(g) for g in needs[:i]) for i in range(len(needs) + 1)]
    caches: list[ActivationCache] = []
    states = [{} for _ in plans]

    def dispatch(call: int, t: float, current: list[dict]) -> None:
        for i, fn in enumerate(on_call or []):
            if fn is not None:
                fn(call, t, View(caches[bounds[i]:bounds[i + 1]], current=True, state=states[i]))

    generated = None  # early exit leaves the block before the drive returns
    capture = bb.probe.capture(flat, early_exit=early, attention=bb.attention_capture,
                               on_step=dispatch if on_call else None) if flat else nullcontext(())
    with ExitStack() as watching, torch.set_grad_enabled(grad), capture as captured:
        for plan, state, b in zip(plans, states, block_of):
            if plan.watch is not None:
                state["rows"] = slice(offset + starts[b], offset + starts[b] + counts[b])
                state["watch"] = watching.enter_context(plan.watch(bb))
        caches[:] = captured
        generated = run_drive(bb, drive, latents, cond, generator, size, progress, noise=noise)
    views = []
    for i, b in enumerate(block_of):
        rows = None if generated is None else generated[starts[b]:starts[b] + counts[b]]
        views.append(View(caches[bounds[i]:bounds[i + 1]], images=rows, state=states[i]))
    return views


def _skeleton(model):
    """A copy of a diffusers model rebuilt from its config, without its hooks, in its device and dtype: run inside
    a fake mode, what a dry run calls (the model's own hooks, a capture's among them, never see it)."""
    from diffprobe.loading import quiet_libraries

    first, default = next(model.parameters()), torch.get_default_dtype()
    torch.set_default_dtype(first.dtype)   # fake parameters cannot be converted after they are made
    try:
        with torch.device(first.device), quiet_libraries():   # from_config's notices are not the user's business
            return type(model).from_config(model.config).eval().requires_grad_(False)   # frozen, as loaded
    finally:
        torch.set_default_dtype(default)


def _remedy(bb) -> str:
    """What a pass that cannot fit can change: the size, the captures, and a half dtype where it is not one already
    (said to be slow where the CPU has no bfloat16 kernels)."""
    from diffprobe.loading import half_is_slow

    ways = [f"lower image_size (the model's own is {bb.sample_size})", "capture fewer sites", "keep fewer steps"]
    if torch.finfo(bb.dtype).bits > 16:
        slow = " (slow on this CPU: docs/scale.md)" if half_is_slow(bb.device, torch.bfloat16) else ""
        ways.append(f"use dtype=bfloat16{slow}")
    return ", ".join(ways[:-1]) + ", or " + ways[-1]


def pass_activation_bytes(bb, process: str, rows: int, image_rows: int, latent_hw: tuple[int, int],
                          cond: Conditioning, grad: bool = False, needs: tuple[Need, ...] = ()) -> tuple[int, bool]:
    """Peak bytes of the activations of a pass's largest stage: the VAE encoding one block of `image_rows`
    images, one denoiser call on `rows` rows (with `grad`, and its backward to the context, as a fit runs it), or
    the VAE decoding a generation's rows; found by dry runs on fake tensors (diffprobe.memory.forward_peak_bytes)
    of the model's parts rebuilt from their configs, once per shape for a backbone; and whether the shape is new.

    With `needs` (a fit's: a one-step pass with gradients), the dry call runs inside their capture with its early
    exit, as the pass does: it stops once their sites have fired, counts the capture's own tensors (the
    probabilities it recomputes, their graph with `grad`, what it keeps), and the backward starts from what it
    kept."""
    key = (process, rows, image_rows, latent_hw, grad, needs)
    new = key not in bb.activation_peaks
    if new:
        pixels = latent_hw[0] * bb.grid_factor, latent_hw[1] * bb.grid_factor
        latent = (bb.vae.config.latent_channels, pixels[0] // bb.vae_factor, pixels[1] // bb.vae_factor)
        added = None if cond.added is None else {k: v[:1].expand(rows, *v.shape[1:]) for k, v in cond.added.items()}
        made = {"device": bb.device, "dtype": bb.dtype}

        def denoise(dry):
            context = torch.empty(rows, *cond.context.shape[1:], **made).requires_grad_(grad)
            call = lambda: unet_call(dry, torch.empty(rows, *latent, **made), 0, Conditioning(context, added))  # noqa: E731
            if not needs:
                out = call()
                if grad:
                    out.sum().backward()
                return
            with dry.probe.capture(list(needs), early_exit=True, attention=bb.attention_capture) as caches:
                call()
            kept = [c[name] for c in caches for name in c.names]
            if grad:
                sum(t.float().sum() for t in kept if t.requires_grad).backward()

        stages = [denoise]
        if process == "generation":
            stages.append(lambda dry: decode_latents(dry, torch.empty(rows, *latent, **made)))
        else:
            stages.append(lambda dry: dry.vae.encode(torch.empty(image_rows, 3, *pixels, **made)))
        skeleton = lambda: replace(bb, unet=_skeleton(bb.unet), vae=_skeleton(bb.vae))  # noqa: E731
        bb.activation_peaks[key] = max(forward_peak_bytes(stage, skeleton, grad) for stage in stages)
    return bb.activation_peaks[key], new


def check_pass_fits(bb, plans: Sequence[Plan], needs: Sequence[Need], latent_hw: tuple[int, int], tokens: int,
                    activations: int = 0, new_shape: bool = False, captured: bool = False) -> None:
    """Refuse a pass whose captures, head computations and largest stage's `activations` cannot fit in memory,
    before it starts (`captured`: the activations' dry run held the captures, as a fit's does). For a pass
    of a `new_shape` (later passes of it reuse the memory the first one freed), count the mapped weights it has not
    read yet and log the process's estimated peak: what it holds with its mapped weights read, plus those."""
    drive = plans[0].drive
    captures = 0
    for need in needs:   # the steps kept, and while a later call runs, its value beside them
        steps = need.reduce.steps
        kept = drive.calls if steps == "all" else (len(steps) if not isinstance(steps, str) else 1)
        held = kept + (1 if drive.calls > 1 else 0)
        captures += bb.probe.bytes_per_call(need, latent_hw, need.rows[1] - need.rows[0], tokens) * held
    work = max((p.work(latent_hw) for p in plans if p.work is not None), default=0)
    # heads finish one after another, once the model's calls are done
    total = max(activations, captures + work) if captured else captures + max(activations, work)
    # mapped weights not yet read from disk will need memory too; a pass of a shape that ran before has read what
    # it reads, so its resident size says it all (/proc/self/smaps, tens of ms to read, is read for new shapes only)
    in_use = resident_when_weights_read() if new_shape else rss_bytes()
    unread = max(0, in_use - rss_bytes())
    image = latent_hw[0] * bb.grid_factor, latent_hw[1] * bb.grid_factor
    check_fits(total + unread, f"this pass at {image[0]} x {image[1]} px (activations {size_text(activations)}, "
               f"captures {size_text(captures)}, heads {size_text(work)}, weights not yet read "
               f"{size_text(unread)})", _remedy(bb))
    estimate = in_use + total
    if new_shape:
        log.info("peak memory estimate: %d bytes (%s: %s in use with the weights read, activations %s, captures "
                 "%s, heads %s)", estimate, size_text(estimate), size_text(in_use), size_text(activations),
                 size_text(captures), size_text(work))


def _block_inputs(bb, drive: Drive, x: torch.Tensor, generator: torch.Generator | None):
    """(latents, noise or None, the generator copy after its draws) of one block of images: every block
    draws from its own copy of the generator, so each plan sees what it would see in a pass of its own."""
    g = _fork(generator)
    latents = encode_images(bb, x, sample=drive.sample_latent, generator=g)
    noise = None
    if drive.process == "one_step" and drive.noise:
        noise = torch.randn(latents.shape, generator=g, device="cpu").to(latents.device, latents.dtype)
    return latents, noise, g


def group_by_drive(plans: Sequence[Plan]) -> list[list[int]]:
    """Indices of plans grouped by equal drives, in first-seen order."""
    groups: list[list[int]] = []
    for i, plan in enumerate(plans):
        for g in groups:
            if plans[g[0]].drive == plan.drive:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _splits(plan: Plan, x: torch.Tensor | None) -> bool:
    return plan.batch is not None and x is not None and len(x) > plan.batch


def _item_work(head: Head, sites: Mapping[str, Site], item: Any, latent_hw: tuple[int, int]) -> int:
    return head.work(sites, latent_hw, item)


def run_heads(bb, heads: Sequence[Head], item: Any, generator: torch.Generator | None = None,
              progress: bool = False) -> list[Any]:
    """Every head's result for one item: plans grouped by drive, one pass per group. Each pass draws from
    a copy of `generator` in its current state, so every head sees the noise it would see run alone."""
    sites = bb.probe.sites
    plans = [replace(h.plan(sites), work=partial(_item_work, h, sites, item)) for h in heads]
    inputs = [h.inputs(item) for h in heads]
    draws = [h.draws(x) for h, x in zip(heads, inputs)]
    results: list[Any] = [None] * len(heads)
    for group in group_by_drive(plans):
        for i in [i for i in group if _splits(plans[i], inputs[i])]:
            if type(heads[i]).on_call is not Head.on_call or plans[i].watch is not None:
                raise DiffprobeError(f"the streaming or watching head {heads[i].name} cannot split its rows "
                                     "(Plan.batch)")
            source = draws[i] or _fork(generator)
            x, n = inputs[i], plans[i].batch
            views = [run_plans(bb, [plans[i]], [x[k:k + n]], source, progress=progress)[0] for k in range(0, len(x), n)]
            results[i] = heads[i].finish(View.join(views), item)
            group = [g for g in group if g != i]
        if not group:
            continue
        streams = [heads[i].on_call if type(heads[i]).on_call is not Head.on_call else None for i in group]
        views = run_plans(bb, [plans[i] for i in group], [inputs[i] for i in group], _fork(generator),
                          on_call=streams if any(streams) else None, progress=progress,
                          draws=[draws[i] for i in group])
        for i, view in zip(group, views):
            results[i] = heads[i].finish(view, item)
    return results
