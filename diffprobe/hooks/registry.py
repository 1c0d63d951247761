"""ProbeRegistry: the named capture sites of a UNet and the scoped, exception-safe capture context."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from diffprobe.hooks.attention import attention_probs, check_supported, query_grid, upsample_tokens
from diffprobe.hooks.cache import ActivationCache, BatchLayout, Reduce
from diffprobe.hooks.sites import Site, enumerate_sites, select_sites

StepCallback = Callable[[int, float, dict], None]


class StopForward(Exception):
    """Raised inside the UNet forward by an early-exit capture once its last site fired; the capture swallows it."""


def _timestep_value(t) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else float("nan")
    return float(t)


class _Capture:
    """State of one active capture: its hooks, its cache and the step counter."""

    def __init__(self, registry: "ProbeRegistry", names: list[str], reduce: Reduce, layout: BatchLayout,
                 detach: bool, device, dtype, upsample_queries, early_exit: bool, on_step: StepCallback | None):
        self.registry, self.names = registry, names
        self.layout, self.detach = layout, detach
        self.device, self.dtype = device, dtype
        self.upsample = (upsample_queries, upsample_queries) if isinstance(upsample_queries, int) else upsample_queries
        self.early_exit, self.on_step = early_exit, on_step
        self.cache = ActivationCache(reduce, {n: registry.sites[n] for n in names})
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.step = -1
        self.latent_hw: tuple[int, int] | None = None
        self.fired: set[str] = set()
        self.current: dict[str, torch.Tensor] = {}

    # -- UNet-level hooks: step counting and per-step callback ----------------------------------
    def _unet_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.step += 1
        self.latent_hw = tuple(sample.shape[-2:])
        self.cache.timesteps.append(_timestep_value(t))
        self.fired.clear()
        self.current = {}

    def _unet_post(self, module, args, kwargs, output):
        if self.on_step is not None:
            self.on_step(self.step, self.cache.timesteps[-1], self.current)
        self.current = {}

    # -- site hooks ---------------------------------------------------------------------------------
    def _store(self, name: str, value: torch.Tensor, grid, key_grid=None) -> None:
        if self.detach:
            value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device or value.device, dtype=self.dtype or value.dtype)
        step = max(self.step, 0)
        self.cache._put(name, step, value, grid=grid, key_grid=key_grid)
        self.current[name] = value
        self.fired.add(name)
        if self.early_exit and len(self.fired) == len(self.names):
            raise StopForward(self)

    def _attention_hook(self, name: str, site: Site):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            rows = self.layout.rows(hidden.shape[0])
            hidden = hidden[rows]
            context = None if context is None or site.kind == "self_attn" else context[rows]
            mask = None if mask is None else mask[rows]
            grid = query_grid(hidden.shape[1], self.latent_hw)
            key_grid = grid if site.kind == "self_attn" else None
            if site.kind == "cross_attn" and self.upsample is not None:
                hidden, grid = upsample_tokens(hidden, grid, self.upsample), tuple(self.upsample)
            grad = not self.detach and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                probs = attention_probs(module, hidden, context, mask, self.cache.reduce.heads, grad=grad)
            self._store(name, probs, grid, key_grid)
        return hook

    def _feature_hook(self, name: str):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            value = value[self.layout.rows(value.shape[0])]
            self._store(name, value, tuple(value.shape[-2:]))
        return hook

    def install(self) -> None:
        reg = self.registry
        self.handles.append(reg.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        self.handles.append(reg.unet.register_forward_hook(self._unet_post, with_kwargs=True))
        for name in self.names:
            site = reg.sites[name]
            module = reg.unet.get_submodule(site.module)
            if site.is_attention:
                self.handles.append(module.register_forward_hook(self._attention_hook(name, site), with_kwargs=True))
            elif site.kind == "resnet":
                self.handles.append(module.conv2.register_forward_hook(self._feature_hook(name)))
            else:
                self.handles.append(module.register_forward_hook(self._feature_hook(name)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class ProbeRegistry:
    """Named capture sites of a diffusers UNet2DConditionModel.

    >>> probe = ProbeRegistry(unet)
    >>> with probe.capture("up_blocks.*.attn2.hook_probs") as cache:
    ...     unet(latents, t, encoder_hidden_states=context)
    >>> cache["up_blocks.1.attentions.0.transformer_blocks.0.attn2.hook_probs"].shape  # (B, h*w, tokens)
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.sites: dict[str, Site] = enumerate_sites(unet)

    def select(self, selection) -> list[str]:
        """Site names matching a glob, a list of names/globs or a predicate on Site, in execution order."""
        return select_sites(self.sites, selection)

    @contextlib.contextmanager
    def capture(
        self,
        selection,
        reduce: Reduce = Reduce(),
        layout: BatchLayout = BatchLayout(),
        detach: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        upsample_queries: int | tuple[int, int] | None = None,
        early_exit: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[ActivationCache]:
        """Capture the selected sites during UNet calls made inside the block; yields the ActivationCache.

        Only the hooks installed here are removed on exit, also when the block raises; captures nest.
        With early_exit, the UNet forward stops (StopForward, swallowed here) once every selected site has
        fired in the current call: code after that call inside the block does not run.
        """
        names = self.select(selection)
        for name in names:
            site = self.sites[name]
            if site.is_attention:
                check_supported(self.unet.get_submodule(site.module), name)
        cap = _Capture(self, names, reduce, layout, detach, device, dtype, upsample_queries, early_exit, on_step)
        cap.install()
        try:
            yield cap.cache
        except StopForward as stop:
            if stop.args[0] is not cap:
                raise
        finally:
            cap.remove()
