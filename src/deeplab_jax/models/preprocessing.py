"""Input normalisation of each backbone, as the official feature extractor does it.

Xception, MobileNet and the `_beta` ResNets map pixels in [0, 255] to [-1, 1] (`2 / 255 * x - 1`);
plain `resnet_v1_*` subtract the ImageNet mean RGB. The mean pixel is the value that preprocessing
maps to zero: what images are padded with, so that padding reads as zeros in the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MEAN_RGB = (123.15, 115.90, 103.06)
_MEAN_SUBTRACTED = ('resnet_v1_50', 'resnet_v1_101')


def mean_pixel(backbone: str) -> tuple[float, float, float]:
  """The pixel value that preprocessing maps to zero: what the input pipeline pads images with."""
  if backbone in _MEAN_SUBTRACTED:
    return MEAN_RGB
  return (127.5, 127.5, 127.5)


def preprocess(images: jax.Array, backbone: str) -> jax.Array:
  """The official feature extractor's input normalisation for `backbone`."""
  images = images.astype(jnp.float32)
  if backbone in _MEAN_SUBTRACTED:
    return images - jnp.asarray(MEAN_RGB, jnp.float32)
  return images * (2.0 / 255.0) - 1.0
