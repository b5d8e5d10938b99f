"""Pictures of labels and predictions: the PASCAL VOC palette, overlays, and PNG files.

Nothing here runs a model; the evaluator and `inference.predict_images` call it with numpy arrays.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
from PIL import Image

from deeplab_jax import paths
from deeplab_jax.datasets.spec import IGNORE_LABEL

IGNORE_COLOUR = (224, 224, 192)  # PASCAL VOC's colour for the ignore band.
OVERLAY_ALPHA = 0.5


def voc_palette(num_colours: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (uint8 [num_colours, 3]); index 255 is VOC's ignore colour."""
  palette = np.zeros((num_colours, 3), np.uint8)
  for index in range(num_colours):
    c, r, g, b = index, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[index] = (r, g, b)
  if num_colours > IGNORE_LABEL:
    palette[IGNORE_LABEL] = IGNORE_COLOUR
  return palette


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """uint8 RGB image of an integer label map, VOC palette by default."""
  palette = voc_palette() if palette is None else palette
  return palette[np.clip(np.asarray(labels), 0, len(palette) - 1).astype(np.int64)]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """`colours` blended over `image` (both uint8 RGB)."""
  blend = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> str:
  """Write a uint8 array (or a PIL image) as PNG to a local path or URL; returns the path."""
  picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
  with paths.open_file(path, 'wb') as f:
    picture.save(f, format='PNG')
  return os.fspath(path)


def write_label_png(path: str | os.PathLike, labels: np.ndarray,
                    palette: np.ndarray | None = None) -> str:
  """A label map as a palette PNG: pixel values are the class ids, shown in VOC colours."""
  picture = Image.fromarray(np.asarray(labels).astype(np.uint8))
  picture.putpalette((voc_palette() if palette is None else palette).reshape(-1).tolist())
  return write_png(path, picture)


def result_stem(split: str, step: int) -> str:
  """`<split>_<step>` with the split made safe for a file name: eval outputs are named after it."""
  safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_') or 'eval'
  return f'{safe}_{int(step)}'


def write_images(workdir: str | os.PathLike, split: str, step: int,
                 images: Mapping[str, np.ndarray]) -> str:
  """Write each summary image as `WORKDIR/eval/<split>_<step>/<i>_<kind>.png` (kind: the last part
  of the summary name, e.g. input, ground_truth, prediction); returns the directory."""
  directory = paths.join(workdir, 'eval', result_stem(split, step))
  paths.makedirs(directory)
  for name, batch in images.items():
    kind = name.split('/')[-1]
    for i, image in enumerate(batch):
      write_png(paths.join(directory, f'{i}_{kind}.png'), image)
  return directory
