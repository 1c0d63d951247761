"""diffprobe's Hydra configs, installed as the package diffprobe.conf (read as pkg://diffprobe.conf)."""
