"""Packages only (everything else is in pyproject.toml): every diffprobe* package, plus the top-level conf/
folder installed as the package diffprobe.conf, so a wheel carries the configs (Hydra reads them as
pkg://diffprobe.conf) as it carries the mini weights."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["diffprobe*"]) + ["diffprobe.conf"], package_dir={"diffprobe.conf": "conf"})
