"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class DiffprobeError(Exception):
    """A user-facing error: bad input, missing weights, incompatible saved state.

    The message must be complete on its own (what was wrong, which path, what to do); the CLI prints
    it without a traceback.
    """
