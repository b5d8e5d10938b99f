"""DeepLab v3+ (and v3 without the decoder): backbone -> ASPP -> decoder -> logits.

Parameter paths joined by '/' are the official TF variable names: `xception_65/...`, `aspp0/weights`,
`aspp1_depthwise/depthwise_weights`, `image_pooling/BatchNorm/gamma`, `concat_projection/...`,
`decoder/feature_projection0/...`, `decoder/decoder_conv0_pointwise/...`, `logits/semantic/weights`.
The module takes images in [0, 255] and returns logits at the input resolution.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers
from deeplab_jax.models.backbones import backbone_scope, build_backbone
from deeplab_jax.models.preprocessing import preprocess

HEAD_BATCH_NORM = layers.BatchNormConfig(decay=0.9997, epsilon=1e-5)


class DeepLab(nn.Module):
  """DeepLab v3+ (`decoder=True`) or v3 (`decoder=False`).

  The fields are `config.model`'s (documented, with their defaults, in `deeplab_jax.config`); build
  it with `deeplab_jax.models.build_model(config.model)`. `atrous_rates` are the ASPP rates at this
  module's `output_stride`; `multi_grid` None takes the backbone's default; `bn_decay` None keeps
  the official BatchNorm decays (short runs need a faster one, or the moving statistics never
  leave their initial values).
  """

  backbone: str
  num_classes: int
  output_stride: int
  atrous_rates: tuple[int, ...]
  multi_grid: tuple[int, int, int] | None
  decoder: bool
  aspp_separable: bool
  decoder_separable: bool
  image_pooling: bool
  aspp_channels: int
  low_level_channels: int
  decoder_channels: int
  width_multiplier: float
  dropout_rate: float
  depthwise_impl: layers.DepthwiseImpl
  freeze_backbone_bn: bool
  dtype: Any
  remat: bool
  bn_decay: float | None
  # Inference: every BatchNorm folded into its conv (`layers.fold_batch_norm`), same variables.
  fold_batch_norm: bool = False
  # Training inside `jax.shard_map` over this mesh axis, on this device's rows of the batch:
  # BatchNorm statistics over the axis (`layers.BatchNormConfig.axis_name`), dropout masks drawn
  # per global row.
  axis_name: str | None = None

  def _backbone(self) -> nn.Module:
    return build_backbone(self.backbone, self.output_stride, self.multi_grid,
                          self.width_multiplier, self.depthwise_impl, self.freeze_backbone_bn,
                          self.dtype, self.remat, self.bn_decay, name=backbone_scope(self.backbone),
                          fold_bn=self.fold_batch_norm,
                          bn_axis_name=self.axis_name)

  @property
  def _head_bn(self) -> layers.BatchNormConfig:
    decay = HEAD_BATCH_NORM.decay if self.bn_decay is None else self.bn_decay
    return layers.BatchNormConfig(decay, HEAD_BATCH_NORM.epsilon, folded=self.fold_batch_norm,
                                  axis_name=self.axis_name)

  def _conv(self, features: int, kernel_size: int, name: str, **kwargs) -> nn.Module:
    return layers.ConvBN(features, kernel_size, bn=self._head_bn, dtype=self.dtype, name=name,
                         **kwargs)

  def _conv3x3(self, x: jax.Array, features: int, name: str, rate: int, separable: bool,
               train: bool) -> jax.Array:
    """A 3x3 [atrous] conv + BN + ReLU: separable (`{name}_depthwise/_pointwise`) or dense."""
    if separable:
      return layers.separable_conv(x, features, name, train=train, rate=rate, bn=self._head_bn,
                                   impl=self.depthwise_impl, dtype=self.dtype)
    return self._conv(features, 3, name, rate=rate)(x, train)

  def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
    if self.axis_name is None or not train or self.dropout_rate == 0.0:
      return nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Each row's mask from its index in the global batch: the same masks on any number of devices.
    keep = 1.0 - self.dropout_rate
    key = self.make_rng('dropout')
    rows = jax.lax.axis_index(self.axis_name) * x.shape[0] + jnp.arange(x.shape[0])
    mask = jax.vmap(lambda row: jax.random.bernoulli(jax.random.fold_in(key, row), keep,
                                                     x.shape[1:]))(rows)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    height, width = images.shape[1:3]
    x = preprocess(images, self.backbone).astype(self.dtype)
    features = self._backbone()(x, train)
    x = features.by_stride[self.output_stride]

    # ASPP: 1x1, atrous 3x3 branches and image-level pooling, concatenated and projected.
    branches = []
    if self.image_pooling:
      # The 1x1 conv runs on [N, C] (the same numbers): TFLite cannot convert it on [N, 1, 1, C].
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
      pooled = self._conv(self.aspp_channels, 1, 'image_pooling')(pooled, train)
      branches.append(jnp.broadcast_to(pooled[:, None, None], (*x.shape[:3], self.aspp_channels)))
    branches.append(self._conv(self.aspp_channels, 1, 'aspp0')(x, train))
    for i, rate in enumerate(self.atrous_rates, start=1):
      branches.append(self._conv3x3(x, self.aspp_channels, f'aspp{i}', rate, self.aspp_separable,
                                    train))
    x = jnp.concatenate(branches, axis=-1)
    x = self._conv(self.aspp_channels, 1, 'concat_projection')(x, train)
    x = self._dropout(x, train)

    if self.decoder:
      x = Decoder(self.low_level_channels, self.decoder_channels, self.decoder_separable,
                  self.depthwise_impl, self.dtype, self._head_bn, name='decoder')(
                      x, features.decoder, train)
    logits = Logits(self.num_classes, self.dtype, name='logits')(x)
    return layers.resize_bilinear(logits.astype(jnp.float32), (height, width))


class Decoder(nn.Module):
  """v3+ decoder: upsample the ASPP output to stride 4, concatenate the 48-channel projection of the
  low-level feature, two [3x3, 256] convs."""

  low_level_channels: int
  channels: int
  separable: bool
  depthwise_impl: layers.DepthwiseImpl
  dtype: Any
  bn: layers.BatchNormConfig

  @nn.compact
  def __call__(self, x: jax.Array, low_level: jax.Array, train: bool) -> jax.Array:
    projected = layers.ConvBN(self.low_level_channels, 1, bn=self.bn, dtype=self.dtype,
                              name='feature_projection0')(low_level, train)
    x = layers.resize_bilinear(x, projected.shape[1:3])
    x = jnp.concatenate([x, projected.astype(x.dtype)], axis=-1)
    for i in range(2):
      name = f'decoder_conv{i}'
      if self.separable:
        x = layers.separable_conv(x, self.channels, name, train=train, bn=self.bn,
                                  impl=self.depthwise_impl, dtype=self.dtype)
      else:
        x = layers.ConvBN(self.channels, 3, bn=self.bn, dtype=self.dtype, name=name)(x, train)
    return x


class Logits(nn.Module):
  """`logits/semantic`: 1x1 conv with biases, no BatchNorm or activation."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.ConvBN(self.num_classes, 1, use_bn=False, activation=None, use_bias=True,
                         dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.01),
                         name='semantic')(x)
