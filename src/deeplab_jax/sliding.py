"""Sliding-window geometry (`config.eval.mode='slide'`): where the windows go and what images are
padded to.

The window is `config.eval.crop_size`; windows start every `stride` pixels from the top-left
(`config.eval.stride`, default `window_stride`: 2/3 of the window, e.g. 769 -> 513, so that
neighbours overlap by about a third). An image is padded at the bottom/right (mean pixel, label 255)
to `padded_size`: the window where it fits, else the smallest `window + k * stride` that holds it,
so the windows tile it exactly. A batch of images of different sizes is padded to the largest
padded size among them, and each row only counts the windows inside its own padded size
(`window_weights`), so an image's logits do not depend on the images it is batched with.

Only integers here (numpy for the per-row weights on device: `inference.predict_slide`); the input
pipeline, the evaluator and the predictor share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections


def window_stride(window: Sequence[int], stride: Sequence[int] | None = None) -> tuple[int, int]:
  """`stride` as (h, w), or the default `2 * (window - 1) // 3 + 1` per axis (769 -> 513)."""
  if stride is None:
    return tuple(2 * (int(d) - 1) // 3 + 1 for d in tuple(window)[:2])
  return int(stride[0]), int(stride[1])


def eval_window(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], tuple[int, int]]:
  """(window, stride) of `config.eval` in slide mode."""
  window = tuple(int(d) for d in tuple(config.eval.crop_size)[:2])
  return window, window_stride(window, config.eval.stride)


def padded_size(size: Sequence[int], window: Sequence[int], stride: Sequence[int]
                ) -> tuple[int, int]:
  """Per axis: the window if the image fits in it, else `window + k * stride` for the smallest k
  that holds the image (the windows then tile it exactly)."""
  return tuple(int(w) + math.ceil(max(int(d) - int(w), 0) / int(s)) * int(s)
               for d, w, s in zip(tuple(size)[:2], tuple(window)[:2], tuple(stride)[:2],
                                  strict=True))


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Top (or left) offsets of the windows along an axis of `size` pixels: 0, stride, 2 * stride,
  ... and, where the last one would stick out, one ending at the edge instead (none when `size`
  is a `padded_size`). A window no smaller than `size` gives the single offset 0."""
  if size <= window:
    return [0]
  count = math.ceil((size - window) / stride) + 1
  return sorted({min(i * stride, size - window) for i in range(count)})


def window_weights(starts: Sequence[tuple[int, int]], window: Sequence[int],
                   stride: Sequence[int], sizes: jax.Array) -> jax.Array:
  """float32 [num_windows, B]: 1 where window k lies inside the padded size of row b's image
  (`sizes` int [B, 2]: each image's own height and width), else 0.

  A row's own windows are those starting at a multiple of the stride not beyond the last start of
  its own `padded_size` (`k * stride < size - window + stride`), and always the first window.
  """
  sizes = jnp.asarray(sizes, jnp.int32)
  rows = []
  for y, x in starts:
    inside_h = (y == 0) | (y < sizes[:, 0] - int(window[0]) + int(stride[0]))
    inside_w = (x == 0) | (x < sizes[:, 1] - int(window[1]) + int(stride[1]))
    rows.append((inside_h & inside_w).astype(jnp.float32))
  return jnp.stack(rows)
