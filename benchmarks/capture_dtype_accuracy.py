"""How close the attention diffprobe captures from a transformer in float16 or bfloat16 is to exact attention.

For every registered transformer family's tiny model (the test models of tests/test_hooks_transformers.py: random
weights, two prompts, a non-square grid, two timesteps), cast to each dtype, it captures every attention site
(per head) and compares it with softmax(q k^T / sqrt(d)) computed in float32 from the same module inputs the
low-precision model received, with the module's weights in float32 (norms and rotary embeddings as the model
applies them). Prints the largest absolute difference per family and dtype.

    python benchmarks/capture_dtype_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_hooks_transformers as helpers  # noqa: E402

from diffprobe.families import Conditioning  # noqa: E402
from diffprobe.hooks import Reduce  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cast(value, dtype):
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def worst_error(structure: str, dtype: torch.dtype) -> float:
    """Largest |captured - exact fp32| over every attention site of `structure`'s tiny model run in `dtype`."""
    tiny = helpers.Tiny(structure)
    tiny.bb.to(dtype=dtype)
    tiny.latents = tiny.latents.to(dtype)
    added = None if tiny.cond.added is None else {k: _cast(v, dtype) for k, v in tiny.cond.added.items()}
    tiny.cond = Conditioning(tiny.cond.context.to(dtype), added)
    inputs = helpers._inputs_of_every_attention(tiny)
    with tiny.probe.capture(lambda s: s.is_attention, reduce=Reduce(heads="none")) as cache:
        tiny()
    n, text, worst = helpers._n(tiny), tiny.family.text_tokens(tiny.bb), 0.0
    for name in cache.names:
        site = tiny.probe.sites[name]
        module = tiny.model.get_submodule(site.module).float()
        want = helpers.explicit_probs(tiny.family, site, module, {k: _cast(v, torch.float32)
                                                                  for k, v in inputs[site.module].items()})
        module.to(dtype)
        if site.part is not None:
            img, txt = (slice(text, text + n), slice(0, text)) if site.text_first else (slice(0, n), slice(n, n + text))
            pick = {"img": img, "txt": txt}
            want = want[..., pick[site.part[:3]], :][..., pick[site.part[4:]]]
        worst = max(worst, (cache[name].float() - want).abs().max().item())
    return worst


def main() -> None:
    print("| family | " + " | ".join(str(d).replace("torch.", "") for d in DTYPES) + " |")
    print("|---" * (len(DTYPES) + 1) + "|")
    with torch.no_grad():
        for structure in helpers.TRANSFORMERS:
            print(f"| {structure} | " + " | ".join(f"{worst_error(structure, d):.1e}" for d in DTYPES) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
