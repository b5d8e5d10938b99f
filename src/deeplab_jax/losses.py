"""Per-pixel softmax cross-entropy as the official DeepLab training loss.

Pixels labelled `ignore_label` (255) have weight zero. With class weights, a pixel's loss is scaled by
its class weight and the sum is still divided by the number of valid pixels (the official
`num_present = sum(not_ignore_mask)`). With `top_k_percent_pixels < 1` (hard-pixel mining) only the
`int(top_k * num_pixels)` largest weighted pixel losses are kept and averaged over those that are
non-zero, as the official code does. The official code mines per GPU clone; here the top-k is taken
over the global batch, which equals the official result with a single clone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from deeplab_jax import reductions
from deeplab_jax.datasets.spec import IGNORE_LABEL
from deeplab_jax.errors import ConfigError


def pixel_losses(logits: jax.Array, labels: jax.Array, *, ignore_label: int = IGNORE_LABEL,
                 class_weights: Sequence[float] | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted per-pixel cross-entropy [B, H, W] (0 at ignored pixels) and the valid mask."""
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    if len(class_weights) != num_classes:
      raise ConfigError(f'config.train.class_weights has {len(class_weights)} entries for '
                       f'{num_classes} classes; give one weight per class.')
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe_labels]
  return losses * weights, valid


def segmentation_loss(logits: jax.Array, labels: jax.Array, *, ignore_label: int = IGNORE_LABEL,
                      class_weights: Sequence[float] | None = None,
                      top_k_percent_pixels: float = 1.0, axis_name: str | None = None) -> jax.Array:
  """Mean cross-entropy of `logits` [B, H, W, C] against int `labels` [B, H, W] (see module doc).

  With `axis_name` (inside `jax.shard_map`, this device's rows of the global batch): the global
  batch's loss, the same on every device, with sums over the devices in a fixed order
  (`reductions`); each device's gradient is its share of the global one.
  """
  if not 0.0 < top_k_percent_pixels <= 1.0:
    raise ConfigError(f'config.train.top_k_percent_pixels={top_k_percent_pixels} must be in (0, 1].')
  losses, valid = pixel_losses(logits, labels, ignore_label=ignore_label,
                               class_weights=class_weights)
  if top_k_percent_pixels >= 1.0:
    total = jnp.stack([jnp.sum(losses), jnp.sum(valid.astype(jnp.float32))])
    if axis_name is not None:
      total = reductions.ordered_total(total, axis_name)
    return total[0] / jnp.maximum(total[1], 1.0)
  if axis_name is not None:  # The top-k of the global batch: every device takes it alike.
    losses = reductions.gather_rows(losses, axis_name)
  flat = losses.reshape(-1)
  k = max(int(top_k_percent_pixels * flat.shape[0]), 1)
  top, _ = jax.lax.top_k(flat, k)
  num_present = jnp.sum((top != 0.0).astype(jnp.float32))
  return jnp.sum(top) / jnp.maximum(num_present, 1.0)


def pixel_accuracy(logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL,
                   axis_name: str | None = None) -> jax.Array:
  """Fraction of non-ignored pixels whose argmax is the label (a training-batch diagnostic); with
  `axis_name`, of the global batch (inside `jax.shard_map`)."""
  valid = labels != ignore_label
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  counts = jnp.stack([jnp.sum(correct), jnp.sum(valid)]).astype(jnp.int32)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)  # Integers: exact in any order.
  return counts[0] / jnp.maximum(counts[1], 1)
