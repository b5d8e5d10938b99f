"""The official TF1 DeepLab v3+ variable names and shapes (tests/data/reference/, see its README)."""

from __future__ import annotations

import pathlib

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / 'data' / 'reference'
XCEPTION_TSV = 'tf1_xception65_deeplabv3plus_os16.tsv'
RESNET_TSV = 'tf1_resnet101beta_deeplabv3plus_os16.tsv'


def reference_shapes(filename: str) -> dict[str, tuple[int, ...]]:
  """{official TF name: shape (TF layout)} of one reference file."""
  rows = [line.split('\t') for line in (REFERENCE_DIR / filename).read_text().splitlines()[1:]]
  return {row[0]: tuple(int(d) for d in row[1].split(',')) for row in rows if row[0]}
