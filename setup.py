"""Packages only (everything else is in pyproject.toml): every diffprobe* package, plus the top-level conf/
folder installed as the package diffprobe.conf, so a wheel carries the configs (Hydra reads them as
pkg://diffprobe.conf) as it carries the mini weights, and docs/ as diffprobe.docs (`--help` points to it)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["diffprobe*"]) + ["diffprobe.conf", "diffprobe.docs"],
      package_dir={"diffprobe.conf": "conf", "diffprobe.docs": "docs"})
