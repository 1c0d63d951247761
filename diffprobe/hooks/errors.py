"""The errors of diffprobe.hooks: user-facing (the CLI prints them as one line) and catchable as the
built-in types older code expects."""

from diffprobe.errors import DiffprobeError


class SiteNotFound(DiffprobeError, KeyError):
    """A site name or glob matches no capture site of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedAttention(DiffprobeError, ValueError):
    """An attention module uses something the probability recomputation does not reproduce (norms on q/k,
    added projections, ...); the message names the module and what it uses."""
