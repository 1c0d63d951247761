"""Whitespace-separated annotation tables (CUB, CelebA): read rows with clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

from diffprobe.errors import DiffprobeError


def require_file(path: Path, dataset: str) -> Path:
    """Return `path` if it is a file, else a DiffprobeError naming the dataset layout that expects it."""
    if not path.is_file():
        raise DiffprobeError(f"{dataset}: missing annotation file {path} (is data.root the dataset folder?)")
    return path


def read_rows(path: Path, min_cols: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Rows of `path` split on whitespace, as (line number, fields); blank lines dropped.

    skip: header lines to ignore. Every kept row must have at least `min_cols` fields.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) < min_cols:
                raise DiffprobeError(f"{path}:{lineno}: expected at least {min_cols} fields, got {len(fields)}")
            rows.append((lineno, fields))
    return rows


def parse_numbers(path: Path, lineno: int, fields: list[str], kind=float) -> list:
    """Convert fields to numbers of `kind`, with the file and line in the error."""
    try:
        return [kind(v) for v in fields]
    except ValueError:
        raise DiffprobeError(f"{path}:{lineno}: expected numbers, got {' '.join(fields)}") from None
