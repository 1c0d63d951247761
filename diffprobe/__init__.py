"""diffprobe: probe the internals of text-to-image diffusion models.

`diffprobe.hooks` is the shared capture registry and can be imported alone; heads live in
`diffprobe.heads`, command-line tasks in `diffprobe.tasks`.
"""

__version__ = "0.1.0"

from diffprobe import families as _families  # noqa: E402,F401  (each family registers itself in diffprobe.hooks)


def trace(pipe, sites=None, steps: str = "mean", concepts=None, **concept_options):
    """Word heat maps over a diffusers pipeline's generation: `with diffprobe.trace(pipe) as tr: pipe(prompt)`, then
    `tr.word_map("bird")`; with concepts=[...], `tr.concept_maps()` (ConceptAttention; diffprobe.tracing.Trace)."""
    from diffprobe.tracing import Trace

    return Trace(pipe, sites, steps, concepts, **concept_options)
