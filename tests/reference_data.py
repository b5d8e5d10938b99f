"""The official TF1 DeepLab variable names and shapes, and reference outputs of the official graph
(tests/data/reference/, see its README)."""

from __future__ import annotations

import math
import pathlib

import numpy as np

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / 'data' / 'reference'
XCEPTION_TSV = 'tf1_xception65_deeplabv3plus_os16.tsv'
RESNET_TSV = 'tf1_resnet101beta_deeplabv3plus_os16.tsv'
MOBILENET_TSV = 'tf1_mobilenetv2_deeplabv3_os16.tsv'
MOBILENET_DM05_TSV = 'tf1_mobilenetv2_dm05_deeplabv3_os16.tsv'
MOBILENET_OUTPUTS = 'tf1_mobilenetv2_outputs_65x65.npz'


def reference_shapes(filename: str) -> dict[str, tuple[int, ...]]:
  """{official TF name: shape (TF layout)} of one reference file."""
  rows = [line.split('\t') for line in (REFERENCE_DIR / filename).read_text().splitlines()[1:]]
  return {row[0]: tuple(int(d) for d in row[1].split(',')) for row in rows if row[0]}


def reference_values(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """The variable values the reference outputs were computed with (README): one standard normal
  draw per variable in sorted-name order, shaped into plausible BatchNorm statistics and
  fan-in-scaled kernels so that activations stay O(1) through the network."""
  rng = np.random.default_rng(seed)
  values = {}
  for name in sorted(shapes):
    shape = shapes[name]
    value = rng.standard_normal(shape, dtype=np.float32)
    leaf = name.split('/')[-1]
    if leaf == 'moving_variance':
      value = np.abs(value) + 0.5
    elif leaf == 'gamma':
      value = 1.0 + 0.1 * value
    elif leaf == 'weights':
      value = value / np.float32(math.sqrt(shape[0] * shape[1] * shape[2]))
    elif leaf == 'depthwise_weights':
      value = value / np.float32(math.sqrt(shape[0] * shape[1]))
    values[name] = value
  return values


def reference_image() -> np.ndarray:
  """The input of the reference outputs: float32 [1, 65, 65, 3] in 0..255."""
  return np.random.default_rng(1).uniform(0, 255, (1, 65, 65, 3)).astype(np.float32)


def reference_outputs() -> dict[str, np.ndarray]:
  with np.load(REFERENCE_DIR / MOBILENET_OUTPUTS) as data:
    return {k: data[k] for k in data.files}
