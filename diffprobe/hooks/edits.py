"""Edits by site name: change what a denoiser computes at the sites ProbeRegistry names, for the calls made inside
a `with probe.intervene({...}):` block, restored on exit (also when the block raises).

    from diffprobe.hooks.edits import Scale, Heads, Add, Set
    with probe.intervene({"*.attn2.hook_probs": Scale(columns=(5,), factor=0.0),      # ablate token 5's columns
                          "mid_block.hook_out": Add(vector)}):                          # steer a feature
        unet(latents, t, encoder_hidden_states=context)

Attention edits act on the probabilities the layer multiplies with its values: the module's own
scaled_dot_product_attention call is answered by itself (diffprobe.hooks.kernel, a TorchFunctionMode under forward
hooks; no processor or diffusers code replaced), and the edit's change is added to its output as
(P' - P) @ V, P recomputed from the exact q, k it was given (qk norms, RoPE, masks included), in fp32. An identity
edit adds exact zeros: outputs bit-identical to a bare call. On a joint attention (SD3, FLUX) an edit at a block
site (`hook_img2txt`, ...) changes that block only (image queries x text keys for img2txt) and leaves the other
rows alone. Gradients flow through the change. Feature edits replace the site's tensor in the module's output
(B, C, h, w as captured; the family writes it back into the module's own output layout) before any capture hook
reads it, so a capture of the same site records the edited feature; a capture of an edited attention site records
the softmax the layer computed (the edit is known to the caller). A UNet down block's edit changes its output to
the next block, not its skip connections.

Every edit takes `steps` (indices of the calls made inside the block, 0 first; None: every call) and `rows` (the
batch rows it applies to, (start, stop); None: all).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from diffprobe.hooks.attention import attention_with_lse
from diffprobe.hooks.capture import _ACTIVE, part_slices
from diffprobe.hooks.errors import DiffprobeError
from diffprobe.hooks.kernel import answer_attention

_EDITED: dict[int, int] = defaultdict(int)   # id(model) -> active interventions with attention edits on it


@dataclass(frozen=True, kw_only=True)
class Edit:
    """Base of every edit: when and where in the batch it applies; `target`: what it changes ("probs": a site's
    attention probabilities (b, heads, Q, K); "output": an attention's per-head output (b, heads, Q, d); "features":
    a feature site's (b, C, h, w); "any": probabilities or features)."""

    steps: Sequence[int] | None = None
    rows: tuple[int, int] | None = None
    target = "any"

    def active(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def row_slice(self, batch: int) -> slice:
        return slice(0, batch) if self.rows is None else slice(*self.rows)

    def apply(self, x: torch.Tensor, step: int, rows: slice) -> torch.Tensor:
        """The edited tensor for `x`, the rows `rows` (of the whole batch) of the site's tensor at call `step`;
        never in place."""
        raise NotImplementedError


@dataclass(frozen=True)
class Scale(Edit):
    """Multiply key columns of the attention probabilities by `factor` (0: ablate them), not renormalised, as
    Prompt-to-Prompt's AttentionReweight does; `renormalise=True` rescales each query's row to sum as before.
    Columns index the site's keys: text tokens on cross-attention and on a joint map's img2txt block."""

    columns: Sequence[int] = ()
    factor: float | torch.Tensor = 0.0
    renormalise: bool = False
    target = "probs"

    def apply(self, x, step, rows):
        weights = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        if any(not -x.shape[-1] <= c < x.shape[-1] for c in self.columns):
            raise DiffprobeError(f"Scale columns {list(self.columns)}: the site has {x.shape[-1]} keys")
        if self.columns:
            weights[list(self.columns)] = torch.as_tensor(self.factor, dtype=x.dtype, device=x.device)
        y = x * weights
        if self.renormalise:
            y = y * (x.sum(-1, keepdim=True) / y.sum(-1, keepdim=True).clamp(min=1e-12))
        return y


def _value_at(value: torch.Tensor, per_step: bool, rows_of_value: bool, x: torch.Tensor, step: int,
              rows: slice) -> torch.Tensor:
    """A given tensor at call `step` (per_step: value (S, ...)), its batch rows `rows` when it holds every row of the
    batch (a leading axis of 1 broadcasts), on x's device."""
    value = value[step] if per_step else value
    if rows_of_value and value.ndim == x.ndim and value.shape[0] != 1:
        value = value[rows]
    return value.to(x.device)


@dataclass(frozen=True)
class Set(Edit):
    """Replace the site's tensor by `value` (broadcastable to it): probabilities or features cached from another run
    (activation patching), or any tensor. `per_step`: value is (S, ...) indexed by the call; `rows_of_value`: the
    value holds every row of the batch (its edited rows are taken), else exactly the edited rows."""

    value: torch.Tensor | None = None
    per_step: bool = False
    rows_of_value: bool = True

    def apply(self, x, step, rows):
        return _value_at(self.value, self.per_step, self.rows_of_value, x, step, rows).to(x.dtype).expand_as(x)


@dataclass(frozen=True)
class Replace(Edit):
    """Prompt-to-Prompt's word swap (AttentionReplace): the site's probabilities become the source run's mapped to
    this prompt's tokens, source (S or B, heads, Q, K) @ mapper (K, K) (`replacement_mapper`); per_step and rows
    as Set. Acts on cross-attention (or an img2txt block)."""

    source: torch.Tensor | None = None
    mapper: torch.Tensor | None = None
    per_step: bool = True
    target = "probs"

    def apply(self, x, step, rows):
        value = _value_at(self.source, self.per_step, True, x, step, rows).float()
        return (value @ self.mapper.to(x.device, torch.float32)).to(x.dtype).expand_as(x)


def word_token_columns(tokenizer, prompt: str) -> list[list[int]]:
    """The token columns of each space-separated word of `prompt` by position (Prompt-to-Prompt's word indexing), after
    the start token when the tokenizer adds one."""
    words = prompt.split(" ")
    start = 1 if tokenizer.bos_token_id is not None and tokenizer(prompt).input_ids[:1] == [tokenizer.bos_token_id] \
        else 0
    ends = [len(tokenizer(" ".join(words[:i]), add_special_tokens=False).input_ids) if i else 0
            for i in range(len(words) + 1)]
    return [list(range(start + a, start + b)) for a, b in zip(ends, ends[1:])]


def replacement_mapper(tokenizer, source: str, target: str, length: int = 77, aligned: bool = False) -> torch.Tensor:
    """Prompt-to-Prompt's replacement mapper (seq_aligner.get_replacement_mapper_): (length, length), the identity
    except at the words that differ (position by position; equal word counts needed), where a source word's columns
    map to the target word's (1 if they have as many tokens, else 1 / its token count to each). After the last
    swapped word the reference continues with mapper[j, j] at the target's index, so when a swapped word's token count
    changed, later source columns map one off (kept: the default); aligned=True continues from the source's index."""
    a, b = source.split(" "), target.split(" ")
    if len(a) != len(b):
        raise DiffprobeError(f"a replacement needs prompts of as many words: {len(a)} and {len(b)}")
    swapped = [i for i in range(len(a)) if a[i] != b[i]]
    cols_a, cols_b = word_token_columns(tokenizer, source), word_token_columns(tokenizer, target)
    mapper = torch.zeros(length, length)
    i = j = k = 0
    while i < length and j < length:
        if k < len(swapped) and cols_a[swapped[k]][0] == i:
            src, dst = cols_a[swapped[k]], cols_b[swapped[k]]
            if len(src) == len(dst):
                mapper[src, dst] = 1.0                     # token by token
            else:
                for t in dst:
                    mapper[src, t] = 1 / len(dst)
            k, i, j = k + 1, i + len(src), j + len(dst)
        else:
            mapper[i if (k < len(swapped) or aligned) else j, j] = 1.0
            i, j = i + 1, j + 1
    return mapper


@dataclass(frozen=True)
class Heads(Edit):
    """Ablate attention heads: their output (b, heads, Q, d) set to 0 ("zero") or to its mean over the queries of
    the call ("mean"); on a joint attention block site, the block's query rows only."""

    heads: Sequence[int] = ()
    mode: str = "zero"
    target = "output"

    def apply(self, x, step, rows):
        if self.mode not in ("zero", "mean"):
            raise DiffprobeError(f"Heads mode must be 'zero' or 'mean', not {self.mode!r}")
        keep = torch.ones(x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
        if self.heads:
            keep[list(self.heads)] = 0
        fill = 0 if self.mode == "zero" else x.mean(2, keepdim=True) * (1 - keep)
        return x * keep + fill


@dataclass(frozen=True)
class Add(Edit):
    """Add `vector` ((C,), (C, h, w) or broadcastable to (b, C, h, w)) times `scale` to a feature (steering)."""

    vector: torch.Tensor | None = None
    scale: float = 1.0
    target = "features"

    def apply(self, x, step, rows):
        v = self.vector.to(x.dtype)
        v = v.reshape(1, -1, 1, 1) if v.ndim == 1 and x.ndim == 4 else v
        return x + self.scale * v


@dataclass(frozen=True)
class Clamp(Edit):
    """Clamp a feature (or probabilities) to [min, max] (either may be None)."""

    min: float | None = None
    max: float | None = None

    def apply(self, x, step, rows):
        return x.clamp(self.min, self.max)


@dataclass(frozen=True)
class Apply(Edit):
    """The caller's own edit: fn(x, step) -> a tensor of x's shape (x: the selected rows)."""

    fn: Callable | None = None
    on: str = "any"

    @property
    def target(self):   # type: ignore[override]
        return self.on

    def apply(self, x, step, rows):
        return self.fn(x, step)


def _edit_rows(edits: list[Edit], x: torch.Tensor, step: int) -> torch.Tensor:
    """x (B, ...) with each active edit applied to its rows, in order (no in-place change of x)."""
    for edit in edits:
        if not edit.active(step):
            continue
        rows = edit.row_slice(x.shape[0])
        new = edit.apply(x[rows], step, rows)
        if new.shape != x[rows].shape:
            raise DiffprobeError(f"{type(edit).__name__} gave {tuple(new.shape)} for a site tensor of "
                                 f"{tuple(x[rows].shape)}")
        x = new if (rows.start or 0) == 0 and rows.stop >= x.shape[0] else torch.cat([x[:rows.start], new,
                                                                                        x[rows.stop:]])
    return x


class Intervention:
    """The hooks of one `probe.intervene(...)` block on a registry's model."""

    def __init__(self, registry, edits: dict[str, Edit | Sequence[Edit]]):
        self.registry, self.step, self.latent_hw = registry, -1, None
        self.by_site: dict[str, list[Edit]] = defaultdict(list)
        for selection, given in edits.items():
            given = [given] if isinstance(given, Edit) else list(given)
            if not all(isinstance(e, Edit) for e in given):
                raise DiffprobeError(f"edits of {selection!r} must be diffprobe.hooks.edits Edit objects")
            for name in registry.select(selection):
                site = registry.sites[name]
                for edit in given:
                    kind = "attention" if site.is_attention else "features"
                    fits = edit.target == "any" or (edit.target in ("probs", "output")) == site.is_attention
                    if not fits:
                        raise DiffprobeError(f"{type(edit).__name__} edits {edit.target}; {name} is a {kind} site")
                    self.by_site[name].append(edit)
        self.handles: list = []
        self._counted = False   # whether this intervention is in _EDITED (it edits attention)

    def install(self) -> None:
        reg = self.registry
        modules: dict[str, list[str]] = defaultdict(list)
        for name in self.by_site:
            site = reg.sites[name]
            if site.is_attention:
                modules[site.module].append(name)
        if modules and any(c.attention == "reuse" for c in _ACTIVE.get(id(reg.model), [])):
            raise DiffprobeError("attention edits inside a capture with attention='reuse' would be bypassed: capture "
                                 "with attention='recompute' (the default)")
        self.handles.append(reg.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        for name, edits in self.by_site.items():
            site = reg.sites[name]
            if not site.is_attention:
                module = reg.family.feature_module(reg.model, site)
                self.handles.append(module.register_forward_hook(self._feature_hook(name, edits), with_kwargs=True,
                                                                 prepend=True))
        for path, names in modules.items():
            reg.family.check_attention(reg.model.get_submodule(path), names[0])
            self.handles += answer_attention(reg.model.get_submodule(path), path, self._kernel(names))
        if modules:
            _EDITED[id(reg.model)] += 1
            self._counted = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self._counted:
            key = id(self.registry.model)
            _EDITED[key] -= 1
            if not _EDITED[key]:
                del _EDITED[key]
            self._counted = False

    def _model_pre(self, module, args, kwargs):
        self.latent_hw, _ = self.registry.family.model_call(module, args, kwargs)
        self.step += 1

    def _feature_hook(self, name: str, edits: list[Edit]):
        site, family = self.registry.sites[name], self.registry.family

        def hook(module, args, kwargs, output):
            if not any(e.active(self.step) for e in edits):
                return None
            grid = site.resolution(self.latent_hw)
            value = family.feature_tensor(site, output, grid, (module, args, kwargs))
            edited = _edit_rows(edits, value, self.step)
            return family.put_feature(site, output, edited, grid)
        return hook

    def _kernel(self, names: list[str]):
        sites = [self.registry.sites[n] for n in names]

        def kernel(q, k, v, bias, scale, original):
            out = original()
            active = [(s, [e for e in self.by_site[s.name] if e.active(self.step)]) for s in sites]
            active = [(s, edits) for s, edits in active if edits]
            if not active:
                return out
            grid = sites[0].resolution(self.latent_hw)
            probs = lse = None
            for site, edits in active:
                rows, cols = (part_slices(site, grid, k.shape[-2])[:2] if site.part is not None
                              else (slice(None), slice(None)))
                on_probs = [e for e in edits if e.target != "output"]
                if on_probs and all(isinstance(e, Scale) and not e.renormalise for e in on_probs):
                    lse = _row_lse(q, k, v, bias, scale) if lse is None else lse   # only the scaled columns are made
                    delta = _scaled_columns(on_probs, q, k, v, bias, scale, lse, rows, cols)
                elif on_probs:
                    if probs is None:
                        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
                        probs = torch.softmax(scores if bias is None else scores + bias.float(), -1)
                    block = probs[:, :, rows, cols]
                    delta = (_edit_rows(on_probs, block, self.step) - block) @ v[:, :, cols].float()
                if on_probs:
                    out = _put_rows(out, out[:, :, rows] + delta.to(out.dtype), rows, site.part is not None)
                on_output = [e for e in edits if e.target == "output"]
                if on_output:
                    edited = _edit_rows(on_output, out[:, :, rows], self.step)
                    out = _put_rows(out, edited, rows, site.part is not None)
            return out
        return kernel


def _put_rows(out: torch.Tensor, new: torch.Tensor, rows: slice, block: bool) -> torch.Tensor:
    """out (B, h, N, d) with its query rows `rows` replaced by `new` (all of them unless `block`), not in place."""
    if not block:
        return new
    return torch.cat([out[:, :, :rows.start], new, out[:, :, rows.stop:]], 2)


def _row_lse(q, k, v, bias, scale, chunk: int = 1024) -> torch.Tensor:
    """(B, h, N) log normalisers of the attention's rows: from PyTorch's CPU flash kernel where it serves, else
    explicitly, `chunk` queries at a time (never the whole (N, K) map at once)."""
    fused = attention_with_lse(q, k, v, bias, scale)
    if fused is not None:
        return fused[1].float()
    parts = []
    for i in range(0, q.shape[2], chunk):
        scores = q[:, :, i:i + chunk].float() @ k.float().transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + (bias[..., i:i + chunk, :] if bias.shape[-2] > 1 else bias).float()
        parts.append(torch.logsumexp(scores, -1))
    return torch.cat(parts, 2)


def _scaled_columns(edits: list[Scale], q, k, v, bias, scale, lse, rows: slice, cols: slice) -> torch.Tensor:
    """(P' - P) V for edits that only scale key columns: the probabilities of those columns alone, exp(scores - lse),
    times (product of the factors - 1) per batch row, then times those columns' values -> (B, h, rows, d)."""
    batch, keys = q.shape[0], torch.arange(k.shape[2], device=q.device)[cols]
    picked = sorted({c % len(keys) for e in edits for c in e.columns if -len(keys) <= c < len(keys)})
    if any(not -len(keys) <= c < len(keys) for e in edits for c in e.columns):
        raise DiffprobeError(f"Scale columns beyond the site's {len(keys)} keys")
    weights = torch.ones(batch, len(keys), device=q.device)
    for e in edits:
        factor = torch.ones(len(keys), device=q.device)
        if e.columns:
            factor[list(e.columns)] = torch.as_tensor(e.factor, dtype=torch.float32, device=q.device)
        r = e.row_slice(batch)
        weights = torch.cat([weights[:r.start], weights[r] * factor, weights[r.stop:]])
    at = keys[picked]
    scores = q[:, :, rows].float() @ k[:, :, at].float().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + (bias[..., rows, :] if bias.shape[-2] > 1 else bias)[..., at].float()
    change = torch.exp(scores - lse[:, :, rows, None]) * (weights[:, None, None, picked] - 1)
    return change @ v[:, :, at].float()


def check_no_edits(model: nn.Module) -> None:
    """Refuse a capture with attention='reuse' on a model whose attention is being edited (its answer to the SDPA
    call would bypass the edit)."""
    if _EDITED.get(id(model)):
        raise DiffprobeError("a capture with attention='reuse' inside attention edits would bypass them: capture "
                             "with attention='recompute' (the default)")
