"""diffprobe: probe the internals of Stable Diffusion-style UNets.

`diffprobe.hooks` is the shared capture registry and can be imported alone; heads live in
`diffprobe.heads`, command-line tasks in `diffprobe.tasks`.
"""

__version__ = "0.1.0"
