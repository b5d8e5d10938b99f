"""Boundary accuracy: mIoU in a band (trimap) of width w around label boundaries, the paper's Fig. 5.

Definitions (all on the ground-truth label map, inside each image's own height x width):

- A *boundary pixel* has one of its 8 neighbours inside the image labelled differently. 255
  (ignore) counts as a label here, so the edges of the ignore bands that PASCAL VOC draws around
  objects are boundaries: the paper measures its trimap around those void bands, and a pixel w
  pixels from a void band is within w - 1 of one of our boundary pixels. The image border is no
  boundary, and neither is the edge of the padding (nor anything in it).
- The *band of width w* is every pixel within chessboard distance w of a boundary pixel (a
  (2w + 1) x (2w + 1) square around one contains a boundary pixel): w = 0 is the boundary pixels
  themselves, and the band grows to the whole image as w does.
- Band pixels labelled 255, outside the image (padding) or in padding rows of a batch (`valid`
  False) are not counted; pixels outside the band are ignored. Per width, one confusion matrix of
  the band pixels is accumulated over the split, and mIoU is computed from it as for the whole image
  (`metrics.segmentation_metrics`).

`band_masks` runs on the device (jit, any batch); the evaluator adds `trimap_confusion` of each
batch to int32 counts it flushes to int64 before they can overflow, as for the main matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from deeplab_jax import metrics
from deeplab_jax.datasets.spec import IGNORE_LABEL


def inside_mask(shape: Sequence[int], sizes: jax.Array) -> jax.Array:
  """bool [B, H, W]: the pixels of each row inside its image's (height, width) `sizes` [B, 2]."""
  _, height, width = shape[:3]
  sizes = jnp.asarray(sizes, jnp.int32)
  rows = jnp.arange(height)[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(width)[None, None, :] < sizes[:, 1, None, None]
  return rows & cols


def boundary_mask(labels: jax.Array, inside: jax.Array) -> jax.Array:
  """bool [B, H, W]: pixels inside the image with an 8-neighbour inside it labelled differently."""
  labels = labels.astype(jnp.int32)
  _, height, width = labels.shape
  padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)))
  padded_inside = jnp.pad(inside, ((0, 0), (1, 1), (1, 1)))
  boundary = jnp.zeros(labels.shape, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == dx == 0:
        continue
      neighbour = padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
      neighbour_inside = padded_inside[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
      boundary = boundary | (neighbour_inside & (neighbour != labels))
  return boundary & inside


def _dilate(mask: jax.Array, radius: int) -> jax.Array:
  """`mask` [B, H, W] grown by a (2r + 1) x (2r + 1) square (two separable max filters)."""
  if radius <= 0:
    return mask
  x = mask.astype(jnp.int32)
  pad = ((0, 0), (radius, radius), (0, 0))
  x = lax.reduce_window(x, 0, lax.max, (1, 2 * radius + 1, 1), (1, 1, 1), pad)
  pad = ((0, 0), (0, 0), (radius, radius))
  x = lax.reduce_window(x, 0, lax.max, (1, 1, 2 * radius + 1), (1, 1, 1), pad)
  return x > 0


def band_masks(labels: jax.Array, sizes: jax.Array, widths: Sequence[int]) -> jax.Array:
  """bool [len(widths), B, H, W]: for each width, the band pixels inside the image (all labels,
  255 included; the evaluator leaves 255 out). Widths in any order."""
  inside = inside_mask(labels.shape, sizes)
  boundary = boundary_mask(labels, inside)
  bands, grown, radius = {}, boundary, 0
  for width in sorted(set(int(w) for w in widths)):  # Each band grows the previous one.
    grown = _dilate(grown, width - radius)
    radius = width
    bands[width] = grown & inside
  return jnp.stack([bands[int(w)] for w in widths])


def trimap_confusion(labels: jax.Array, predictions: jax.Array, sizes: jax.Array,
                     valid: jax.Array, widths: Sequence[int], num_classes: int) -> jax.Array:
  """int32 [len(widths), C, C]: the (label, prediction) counts of each band's pixels (labels
  outside [0, C) such as 255, padding and rows with `valid` False left out)."""
  bands = band_masks(labels, sizes, widths)
  keep = valid[:, None, None] & (labels != IGNORE_LABEL)
  return jnp.stack([metrics.confusion_matrix(labels, predictions, num_classes, band & keep)
                    for band in bands])
