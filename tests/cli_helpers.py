"""Running the command line as a user does, and reading its one-line errors."""

import os
import subprocess
import sys


def cli(*args, cwd):
    """`python -m diffprobe ARGS` from `cwd`, offline: the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffprobe", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_error(res, expected: str) -> str:
    """Assert exit code 2 with a last stderr line `diffprobe: error: ...` holding `expected`, no traceback; the line."""
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("diffprobe: error: ") and expected in last, res.stderr
    assert "Traceback" not in res.stderr
    return last
