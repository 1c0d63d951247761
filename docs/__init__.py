"""diffprobe's user documentation (the repository's docs/), installed as the package diffprobe.docs so that a
wheel carries it: `python -m diffprobe --help` prints where it is."""
