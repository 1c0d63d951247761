"""One active capture: the hooks it installed, one cache per Need, the call counter.

Each site is hooked once. Needs of a site with the same compute key (head reduction, query upsampling,
gradients) share one recomputation over the union of their rows; each need then keeps its own rows,
steps, device and dtype. With early exit the forward stops once every site of every need has fired.

Attention modes: "recompute" (default) leaves the model's attention kernel alone and recomputes the
probabilities of a captured layer from its inputs, in fp32 (the model's outputs are bit-identical to an
uncaptured call). "reuse" has each captured layer (without gradients or query upsampling) run diffusers'
sliced attention processor for the duration of the capture, one head at a time, and keeps the probabilities
that processor computes and multiplies with the values: nothing is computed twice; the outputs equal an
uncaptured call to float rounding and the probabilities are in the model's dtype.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from diffprobe.hooks.attention import probs_from_qk, query_grid, upsample_tokens
from diffprobe.hooks.errors import DiffprobeError
from diffprobe.hooks.cache import ActivationCache
from diffprobe.hooks.needs import Need

StepCallback = Callable[[int, float, object], None]


class StopForward(Exception):
    """Raised inside the model's forward by an early-exit capture once its last site fired; the capture swallows it."""


def _timestep_value(t) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else float("nan")
    return float(t)


def _union(slices: list[slice], batch: int) -> slice:
    starts, stops = zip(*(s.indices(batch)[:2] for s in slices))
    return slice(min(starts), max(stops))


ATTENTION_MODES = ("recompute", "reuse")


class _Reused:
    """The probabilities one module's sliced processor hands out during a call, reduced per group of needs as
    they come: slices of the (B * heads, N, K) scores, in order."""

    def __init__(self, heads: int, batch: int, groups: list[tuple[slice, str | int]]):
        self.heads, self.batch, self.groups, self.pos = heads, batch, groups, 0
        self.out: list[torch.Tensor | None] = [None] * len(groups)

    def add(self, probs: torch.Tensor) -> None:
        n, k = probs.shape[-2:]
        for j in range(probs.shape[0]):
            b, h = divmod(self.pos + j, self.heads)
            for g, (rows, mode) in enumerate(self.groups):
                start, stop, _ = rows.indices(self.batch)
                if not start <= b < stop or (isinstance(mode, int) and h != mode):
                    continue
                if self.out[g] is None:
                    shape = (stop - start, self.heads, n, k) if mode == "none" else (stop - start, n, k)
                    self.out[g] = torch.zeros(shape, dtype=torch.float32, device=probs.device)
                p = probs[j].float()
                if mode == "none":
                    self.out[g][b - start, h] = p
                else:
                    self.out[g][b - start] += p / self.heads if mode == "mean" else p
        self.pos += probs.shape[0]


class Capture:
    """State of one capture of `needs` (each resolved to site names) on a registry's model."""

    def __init__(self, registry, needs: list[Need], names: list[list[str]], early_exit: bool,
                 on_step: StepCallback | None, single: bool, attention: str = "recompute"):
        if attention not in ATTENTION_MODES:
            raise DiffprobeError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {attention!r}")
        self.registry, self.needs, self.early_exit, self.on_step, self.single = registry, needs, early_exit, on_step, single
        self.attention = attention
        self.restore: list[Callable[[], None]] = []  # undo the processor swaps of "reuse"
        self.caches = [ActivationCache(n.reduce, {s: registry.sites[s] for s in sel}) for n, sel in zip(needs, names)]
        self.users: dict[str, list[int]] = defaultdict(list)  # site -> indices of the needs that want it
        for i, sel in enumerate(names):
            for s in sel:
                self.users[s].append(i)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self.fired: set[str] = set()

    # -- model-level hooks: call counting and the per-call callback -------------------------------------
    def _model_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.step += 1
        self.latent_hw = tuple(sample.shape[-2:])
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
        if self.early_exit and len(self.fired) == len(self.users):
            raise StopForward(self)

    def _attention_hook(self, name: str, groups: list[list[int]]):
        site = self.registry.sites[name]
        backend = self.registry.backend

        def hook(module, args, kwargs, output):
            hidden, context, mask = backend.attention_call(args, kwargs)
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
                    q, k, bias = backend.attention_qk(module, h, ctx, m)
                    probs = probs_from_qk(q, k, bias, need.reduce.heads, grad=grad)
                self._store(name, probs, rows, batch, users, grid, key_grid)
        return hook

    def _reuse_hooks(self, name: str, module, groups: list[list[int]]):
        """Pre-hook, probability sink and post-hook of a module whose processor hands out its probabilities."""
        site = self.registry.sites[name]
        state: dict[str, _Reused] = {}

        def pre(mod, args, kwargs):
            hidden, _, _ = self.registry.backend.attention_call(args, kwargs)
            batch = hidden.shape[0]
            plan = [(_union([self.needs[i].row_slice(batch) for i in users], batch), self.needs[users[0]].reduce.heads)
                    for users in groups]
            state["call"] = _Reused(int(mod.heads), batch, plan)

        def post(mod, args, kwargs, output):
            call = state.pop("call")
            grid = query_grid(call.out[0].shape[-2], self.latent_hw)
            key_grid = grid if site.kind == "self_attn" else None
            for users, (rows, _), probs in zip(groups, call.groups, call.out):
                self._store(name, probs, slice(*rows.indices(call.batch)[:2]), call.batch, users, grid, key_grid)

        return pre, lambda probs: state["call"].add(probs), post

    def _feature_hook(self, name: str):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            users = self.users[name]
            self._store(name, value, slice(0, value.shape[0]), value.shape[0], users, tuple(value.shape[-2:]))
        return hook

    def install(self) -> None:
        reg = self.registry
        self.handles.append(reg.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(reg.model.register_forward_hook(self._model_post, with_kwargs=True))
        for name, users in self.users.items():
            site = reg.sites[name]
            if site.is_attention:
                groups: dict[tuple, list[int]] = defaultdict(list)
                for i in users:
                    groups[self.needs[i].compute_key()].append(i)
                module = reg.model.get_submodule(site.module)
                reusable = all(not self.needs[i].grad and self.needs[i].upsample_queries is None for i in users)
                if self.attention == "reuse" and reusable:
                    pre, sink, post = self._reuse_hooks(name, module, list(groups.values()))
                    self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(post, with_kwargs=True))
                    self.restore.append(reg.backend.hand_out_probabilities(module, sink))
                    continue
                self.handles.append(module.register_forward_hook(self._attention_hook(name, list(groups.values())),
                                                                 with_kwargs=True))
            else:
                module = reg.backend.feature_module(reg.model, site)
                self.handles.append(module.register_forward_hook(self._feature_hook(name)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for undo in self.restore:
            undo()
        self.restore.clear()
