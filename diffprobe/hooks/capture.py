"""One active capture: the hooks it installed, one cache per Need, the call counter.

Each site is hooked once. Needs of a site with the same compute key (head reduction, query upsampling,
gradients) share one recomputation over the union of their rows; each need then keeps its own rows,
steps, device and dtype. With early exit the forward stops once every site of every need has fired.

Attention modes: "recompute" (default) leaves the model's attention kernel alone and recomputes the
probabilities of a captured layer from its inputs, in fp32 (the model's outputs are bit-identical to an
uncaptured call). "reuse" answers each captured self-attention layer's (without gradients or query upsampling)
call of scaled_dot_product_attention with an explicit attention, a query chunk at a time (diffprobe.hooks.kernel),
and keeps the probabilities it multiplies with the values: nothing is computed twice; the outputs equal an
uncaptured call to float rounding; scores are in the model's dtype, probabilities in fp32. Cross-attention
(a few dozen keys) stays on the recompute path, which measured cheaper than replacing the fused kernel there.
A joint attention of which only blocks are captured (e.g. image-to-text) is answered on the CPU by the fused
flash kernel, which also returns each row's log normaliser, so only the blocks' own scores are computed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from diffprobe.hooks.attention import (attend_keeping, attention_with_lse, probs_from_qk, query_grid,
                                       upsample_tokens)
from diffprobe.hooks.errors import DiffprobeError
from diffprobe.hooks.cache import ActivationCache
from diffprobe.hooks.kernel import answer_attention
from diffprobe.hooks.needs import Need

StepCallback = Callable[[int, float, object], None]


class StopForward(Exception):
    """Raised inside the model's forward by an early-exit capture once its last site fired; the capture swallows it."""


_ACTIVE: dict[int, list["Capture"]] = defaultdict(list)  # id(model) -> the captures installed on it, outermost first


def _timestep_value(t) -> float:
    """The call's timestep as a number; NaN for a tensor without one (empty, or without data: a meta tensor or the
    fake one of a memory estimate's dry run)."""
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() and not (t.is_meta or is_fake(t)) else float("nan")
    return float(t)


def _bias_rows(bias: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The batch rows of an additive bias that has them (a bias broadcast over the batch is kept whole)."""
    return bias if bias is None or bias.shape[0] == 1 else bias[rows]


def part_slices(site, grid: tuple[int, int], num_keys: int) -> tuple[slice, slice, tuple | None, tuple | None]:
    """The query rows and key columns of a joint attention (over `num_keys` image + text tokens) that the part
    site `site` names, with its query and key grids (None for text). A part's image tokens are the grid's h*w;
    the rest are text, before the image (site.text_first) or after it."""
    n = grid[0] * grid[1]
    text = num_keys - n
    image, words = (slice(text, text + n), slice(0, text)) if site.text_first else (slice(0, n), slice(n, n + text))
    rows, cols = site.part[:3], site.part[4:]
    pick = {"img": image, "txt": words}
    return pick[rows], pick[cols], (grid if rows == "img" else None), (grid if cols == "img" else None)


def joint_part(probs: torch.Tensor, site, grid: tuple[int, int]):
    """The block of (.., Q, K) probabilities that `site` names, with its query and key grids (None for text).

    A site without a part is the whole map: self-attention (grids on both sides), cross-attention (a query
    grid) or a whole joint map (no grid).
    """
    if site.part is None:
        if site.kind == "self_attn":
            return probs, grid, grid
        return probs, (grid if site.kind == "cross_attn" else None), None
    rows, cols, query_grid_, key_grid = part_slices(site, grid, probs.shape[-1])
    return probs[..., rows, :][..., cols].clone(), query_grid_, key_grid


def _block(bias: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    """The (rows, cols) block of a bias broadcastable to (B, h, Q, K) (broadcast axes kept)."""
    if bias is None:
        return None
    return bias[..., rows if bias.shape[-2] > 1 else slice(None), :][..., cols if bias.shape[-1] > 1 else slice(None)]


def _by_site(members: list[tuple[str, int]]) -> dict[str, list[int]]:
    """(site name, need index) pairs grouped by site name."""
    users: dict[str, list[int]] = defaultdict(list)
    for name, i in members:
        users[name].append(i)
    return users


def _union(slices: list[slice], batch: int) -> slice:
    starts, stops = zip(*(s.indices(batch)[:2] for s in slices))
    return slice(min(starts), max(stops))


ATTENTION_MODES = ("recompute", "reuse")


class Capture:
    """State of one capture of `needs` (each resolved to site names) on a registry's model."""

    def __init__(self, registry, needs: list[Need], names: list[list[str]], early_exit: bool,
                 on_step: StepCallback | None, single: bool, attention: str = "recompute"):
        if attention not in ATTENTION_MODES:
            raise DiffprobeError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {attention!r}")
        self.registry, self.needs, self.early_exit, self.on_step, self.single = registry, needs, early_exit, on_step, single
        self.attention = attention
        self.caches = [ActivationCache(n.reduce, {s: registry.sites[s] for s in sel}) for n, sel in zip(needs, names)]
        self.users: dict[str, list[int]] = defaultdict(list)  # site -> indices of the needs that want it
        for i, sel in enumerate(names):
            for s in sel:
                self.users[s].append(i)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self.fired: set[str] = set()
        self.inputs: dict[str, torch.Tensor] = {}   # module path -> its image input, until its kernel runs

    # -- model-level hooks: call counting and the per-call callback -------------------------------------
    def _model_pre(self, module, args, kwargs):
        self.latent_hw, t = self.registry.family.model_call(module, args, kwargs)
        self.step += 1
        for cache in self.caches:
            cache.timesteps.append(_timestep_value(t))
            cache.current = {}
        self.fired.clear()

    def _model_post(self, module, args, kwargs, output):
        if self.on_step is not None:
            current = [c.current for c in self.caches]
            self.on_step(self.step, self.caches[0].timesteps[-1], current[0] if self.single else current)

    # -- storing ---------------------------------------------------------------------------------------
    def _store(self, name: str, computed: torch.Tensor, computed_rows: slice, batch: int, users: list[int],
               grid, key_grid=None) -> None:
        for i in users:
            need, cache = self.needs[i], self.caches[i]
            start, stop, _ = need.row_slice(batch).indices(batch)
            value = computed[start - computed_rows.start : stop - computed_rows.start]
            if not need.grad:
                value = value.detach()
            if need.device is not None or need.dtype is not None:
                value = value.to(device=need.device or value.device, dtype=need.dtype or value.dtype)
            cache._put(name, max(self.step, 0), value, grid=grid, key_grid=key_grid)
            cache.current[name] = value
        self.fired.add(name)
        if self.done and all(c.done for c in _ACTIVE[id(self.registry.model)]):  # no other capture still records
            raise StopForward(self)

    @property
    def done(self) -> bool:
        """True for an early-exit capture whose sites have all fired in the current call."""
        return self.early_exit and len(self.fired) == len(self.users)

    def _attention_hook(self, name: str, groups: list[list[int]]):
        site = self.registry.sites[name]
        family = self.registry.family

        def hook(module, args, kwargs, output):
            hidden, context, mask = family.attention_call(args, kwargs)
            batch = hidden.shape[0]
            for users in groups:
                need = self.needs[users[0]]
                rows = _union([self.needs[i].row_slice(batch) for i in users], batch)
                h, ctx = hidden[rows], None if context is None or site.kind == "self_attn" else context[rows]
                m = None if mask is None else mask[rows]
                grid = query_grid(h.shape[1], self.latent_hw)
                key_grid = grid if site.kind == "self_attn" else None
                if site.kind == "cross_attn" and need.upsample_queries is not None:
                    h, grid = upsample_tokens(h, grid, need.upsample_queries), need.upsample_queries
                grad = need.grad and torch.is_grad_enabled()
                with torch.set_grad_enabled(grad):
                    q, k, bias = family.attention_qk(module, h, ctx, m)
                    probs = probs_from_qk(q, k, bias, need.reduce.heads, grad=grad)
                self._store(name, probs, rows, batch, users, grid, key_grid)
        return hook

    def _kernel(self, path: str, names: list[str]):
        """The kernel that answers the SDPA call of the module at `path` whose attention sites (one map, or the
        whole of a joint map and its blocks) are `names`. Needs with one compute key share one computation over the union
        of their rows: in "reuse" mode (no gradients) the output is computed from the kept probabilities, or,
        where only blocks of a joint map are wanted, comes from the fused kernel with its row normalisers;
        otherwise the model's own call gives the output and the probabilities are recomputed from the exact
        q and k it was given (qk norms and rotary embeddings applied), in fp32."""
        groups: dict[tuple, list[tuple[str, int]]] = defaultdict(list)
        upsampled: list[tuple[str, int]] = []   # cross-attention blocks wanted with upsampled queries
        for name in names:
            for i in self.users[name]:
                if self.needs[i].upsample_queries is not None and self.registry.sites[name].kind == "cross_attn":
                    upsampled.append((name, i))
                else:
                    groups[self.needs[i].compute_key()].append((name, i))
        first = self.registry.sites[names[0]]
        blocks_only = all(self.registry.sites[name].part is not None for name in names)

        def kernel(q, k, v, bias, scale, original):
            batch = q.shape[0]
            grid = first.resolution(self.latent_hw)
            if upsampled:
                self._store_upsampled(path, upsampled, k, bias, scale, grid, batch)
            plan = [(_union([self.needs[i].row_slice(batch) for _, i in members], batch),
                     self.needs[members[0][1]].reduce.heads) for members in groups.values()]
            grad = torch.is_grad_enabled() and any(self.needs[i].grad for m in groups.values() for _, i in m)
            differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            fused = (attention_with_lse(q, k, v, bias, scale)
                     if self.attention == "reuse" and not differentiable and blocks_only else None)
            if fused is not None:
                self._store_blocks(groups, plan, q * scale, k, bias, fused[1], grid, batch)
                return fused[0]
            if self.attention == "reuse" and not differentiable:
                out, kept = attend_keeping(q, k, v, bias, scale, plan)
            else:
                out = original()
                kept = [probs_from_qk(q[rows] * scale, k[rows], _bias_rows(bias, rows), heads, grad=grad)
                        for rows, heads in plan]
            for members, (rows, _), probs in zip(groups.values(), plan, kept):
                for name, idx in _by_site(members).items():
                    value, query_grid_, key_grid = joint_part(probs, self.registry.sites[name], grid)
                    self._store(name, value, rows, batch, idx, query_grid_, key_grid)
            return out
        return kernel

    def _store_upsampled(self, path: str, members: list[tuple[str, int]], k, bias, scale, grid, batch) -> None:
        """Image-to-text blocks with upsampled queries: the queries of the module's image input (kept by
        `_keep_input`) upsampled bicubically to each need's grid, through the module's own projection and qk norm
        (the family's `upsampled_queries`), against the call's exact keys; the softmax runs over all keys (image
        and text) as the model's does, and the text columns are kept."""
        hidden = self.inputs.pop(path)
        module = self.registry.model.get_submodule(path)
        if bias is not None and bias.shape[-2] != 1:
            raise DiffprobeError(f"upsample_queries cannot be used at {path}: its attention mask differs per query")
        for name, i in members:
            need, site = self.needs[i], self.registry.sites[name]
            rows = _union([need.row_slice(batch)], batch)
            _, cols, _, _ = part_slices(site, grid, k.shape[-2])
            grad = need.grad and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                q = self.registry.family.upsampled_queries(module, hidden[rows], grid, need.upsample_queries)
                value = probs_from_qk(q * scale, k[rows], _bias_rows(bias, rows), need.reduce.heads, grad=grad,
                                      keys=cols)
            self._store(name, value, rows, batch, [i], need.upsample_queries)

    def _keep_input(self, path: str):
        def hook(module, args, kwargs):
            self.inputs[path] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _store_blocks(self, groups, plan, q, k, bias, lse, grid, batch) -> None:
        """Reuse mode where only blocks of a joint attention are captured: the fused kernel gave the output and
        each query row's log normaliser `lse` (B, h, Q), so a block's probabilities are exp(scores - lse) over its
        own rows and columns only (the image-to-text block: image queries x text keys, not the whole map)."""
        for members, (rows, heads) in zip(groups.values(), plan):
            for name, idx in _by_site(members).items():
                r, c, query_grid_, key_grid = part_slices(self.registry.sites[name], grid, k.shape[-2])
                value = probs_from_qk(q[rows][:, :, r], k[rows][:, :, c], _block(_bias_rows(bias, rows), r, c),
                                      heads, lse=lse[rows][:, :, r])
                self._store(name, value, rows, batch, idx, query_grid_, key_grid)

    def _feature_hook(self, name: str):
        site = self.registry.sites[name]

        def hook(module, args, kwargs, output):
            call = (module, args, kwargs)
            value = self.registry.family.feature_tensor(site, output, site.resolution(self.latent_hw), call)
            users = self.users[name]
            grid = tuple(value.shape[-2:]) if value.ndim == 4 else None
            self._store(name, value, slice(0, value.shape[0]), value.shape[0], users, grid)
        return hook

    def install(self) -> None:
        reg = self.registry
        _ACTIVE[id(reg.model)].append(self)
        self.handles.append(reg.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(reg.model.register_forward_hook(self._model_post, with_kwargs=True))
        at_kernel: dict[str, list[str]] = defaultdict(list)  # module -> its sites answered at the SDPA call
        keep_input: set[str] = set()   # modules whose image input upsampled queries are recomputed from
        for name, users in self.users.items():
            site = reg.sites[name]
            if not site.is_attention:
                module = reg.family.feature_module(reg.model, site)
                self.handles.append(module.register_forward_hook(self._feature_hook(name), with_kwargs=True))
                continue
            needs = [self.needs[i] for i in users]
            if reg.family.captures_at_kernel:
                if site.kind == "cross_attn" and any(n.upsample_queries is not None for n in needs):
                    if not reg.family.upsamples_queries:
                        raise DiffprobeError(f"upsample_queries cannot be used at {name}: {reg.family.name}: "
                                             f"{reg.family.no_upsampled_queries}")
                    keep_input.add(site.module)
                at_kernel[site.module].append(name)
            elif (self.attention == "reuse" and site.kind == "self_attn"
                  and all(not n.grad and n.upsample_queries is None for n in needs)):
                at_kernel[site.module].append(name)   # cross-attention (few keys) is cheaper to recompute
            else:
                groups: dict[tuple, list[int]] = defaultdict(list)
                for i in users:
                    groups[self.needs[i].compute_key()].append(i)
                module = reg.model.get_submodule(site.module)
                self.handles.append(module.register_forward_hook(self._attention_hook(name, list(groups.values())),
                                                                 with_kwargs=True))
        for path in keep_input:
            self.handles.append(reg.model.get_submodule(path).register_forward_pre_hook(self._keep_input(path),
                                                                                        with_kwargs=True))
        for path, names in at_kernel.items():
            self.handles += answer_attention(reg.model.get_submodule(path), path, self._kernel(path, names))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        active = _ACTIVE[id(self.registry.model)]
        if self in active:
            active.remove(self)
        if not active:
            del _ACTIVE[id(self.registry.model)]
