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

from deeplab_jax.models import layers, resnet, xception

BACKBONES = ('xception_41', 'xception_65', 'xception_71', 'resnet_v1_50', 'resnet_v1_101',
             'resnet_v1_50_beta', 'resnet_v1_101_beta')
OUTPUT_STRIDES = (8, 16, 32)
HEAD_BATCH_NORM = layers.BatchNormConfig(decay=0.9997, epsilon=1e-5)
# ImageNet mean RGB that plain `resnet_v1_*` subtract; the others map [0, 255] to [-1, 1].
MEAN_RGB = (123.15, 115.90, 103.06)


def mean_pixel(backbone: str) -> tuple[float, float, float]:
  """The pixel value that preprocessing maps to zero: what the input pipeline pads images with."""
  if backbone in ('resnet_v1_50', 'resnet_v1_101'):
    return MEAN_RGB
  return (127.5, 127.5, 127.5)


def preprocess(images: jax.Array, backbone: str) -> jax.Array:
  """The official feature extractor's input normalisation for `backbone`."""
  images = images.astype(jnp.float32)
  if backbone in ('resnet_v1_50', 'resnet_v1_101'):
    return images - jnp.asarray(MEAN_RGB, jnp.float32)
  return images * (2.0 / 255.0) - 1.0


def default_atrous_rates(output_stride: int) -> tuple[int, ...]:
  """6/12/18 at output stride 16, doubled at 8 and halved at 32."""
  return {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]


def backbone_scope(backbone: str) -> str:
  """The TF scope (and Flax module name) of a backbone."""
  return resnet.scope_name(backbone) if backbone.startswith('resnet') else backbone


def build_backbone(backbone: str, output_stride: int = 16,
                   multi_grid: tuple[int, int, int] | None = None, width_multiplier: float = 1.0,
                   depthwise_impl: layers.DepthwiseImpl = 'auto', freeze_bn: bool = False,
                   dtype: Any = jnp.float32, remat: bool = False, bn_decay: float | None = None,
                   name: str | None = None) -> nn.Module:
  """The backbone module: `apply` returns {stride: feature}, key 4 the decoder's end point.

  `bn_decay` overrides the backbone's official BatchNorm decay (0.9997 Xception, 0.95 ResNet).
  """
  if backbone.startswith('xception'):
    cls, bn, kwargs = xception.Xception, xception.BATCH_NORM, {'depthwise_impl': depthwise_impl}
    grid = multi_grid or (1, 1, 1)
  elif backbone.startswith('resnet'):
    cls, bn, kwargs = resnet.ResNet, resnet.BATCH_NORM, {}
    grid = multi_grid or (1, 2, 4)
  else:
    raise ValueError(f'Unknown backbone {backbone!r}; choose one of {BACKBONES}.')
  bn = layers.BatchNormConfig(bn.decay if bn_decay is None else bn_decay, bn.epsilon,
                              frozen=freeze_bn)
  return cls(architecture=backbone, output_stride=output_stride, multi_grid=tuple(grid),
             width_multiplier=width_multiplier, bn=bn, dtype=dtype, remat=remat, name=name,
             **kwargs)


class DeepLab(nn.Module):
  """DeepLab v3+ (`decoder=True`) or v3 (`decoder=False`)."""

  backbone: str = 'xception_65'
  num_classes: int = 21
  output_stride: int = 16
  atrous_rates: tuple[int, ...] = (6, 12, 18)
  multi_grid: tuple[int, int, int] | None = None  # None: (1, 1, 1) Xception, (1, 2, 4) ResNet.
  decoder: bool = True
  aspp_separable: bool = True
  decoder_separable: bool = True
  image_pooling: bool = True
  aspp_channels: int = 256
  low_level_channels: int = 48
  decoder_channels: int = 256
  width_multiplier: float = 1.0
  dropout_rate: float = 0.1
  depthwise_impl: layers.DepthwiseImpl = 'auto'
  freeze_backbone_bn: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  # Overrides every BatchNorm's decay (official: 0.9997 Xception and head, 0.95 ResNet). Short
  # runs need a faster one, or the moving statistics never leave their initial values.
  bn_decay: float | None = None

  def _backbone(self) -> nn.Module:
    return build_backbone(self.backbone, self.output_stride, self.multi_grid,
                          self.width_multiplier, self.depthwise_impl, self.freeze_backbone_bn,
                          self.dtype, self.remat, self.bn_decay, name=backbone_scope(self.backbone))

  @property
  def _head_bn(self) -> layers.BatchNormConfig:
    if self.bn_decay is None:
      return HEAD_BATCH_NORM
    return layers.BatchNormConfig(self.bn_decay, HEAD_BATCH_NORM.epsilon)

  def _conv(self, features: int, kernel_size: int, name: str, **kwargs) -> nn.Module:
    return layers.Conv2D(features, kernel_size, bn=self._head_bn, dtype=self.dtype, name=name,
                         **kwargs)

  def _conv3x3(self, x: jax.Array, features: int, name: str, rate: int, separable: bool,
               train: bool) -> jax.Array:
    """A 3x3 [atrous] conv + BN + ReLU: separable (`{name}_depthwise/_pointwise`) or dense."""
    if separable:
      return layers.separable_conv(x, features, name, train=train, rate=rate, bn=self._head_bn,
                                   impl=self.depthwise_impl, dtype=self.dtype)[0]
    return self._conv(features, 3, name, rate=rate)(x, train)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    height, width = images.shape[1:3]
    x = preprocess(images, self.backbone).astype(self.dtype)
    features = self._backbone()(x, train)
    x = features[self.output_stride]

    # ASPP: 1x1, atrous 3x3 branches and image-level pooling, concatenated and projected.
    branches = []
    if self.image_pooling:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
      pooled = self._conv(self.aspp_channels, 1, 'image_pooling')(pooled, train)
      branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.aspp_channels)))
    branches.append(self._conv(self.aspp_channels, 1, 'aspp0')(x, train))
    for i, rate in enumerate(self.atrous_rates, start=1):
      branches.append(self._conv3x3(x, self.aspp_channels, f'aspp{i}', rate, self.aspp_separable,
                                    train))
    x = jnp.concatenate(branches, axis=-1)
    x = self._conv(self.aspp_channels, 1, 'concat_projection')(x, train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    if self.decoder:
      x = Decoder(self.low_level_channels, self.decoder_channels, self.decoder_separable,
                  self.depthwise_impl, self.dtype, self._head_bn, name='decoder')(
                      x, features[4], train)
    logits = Logits(self.num_classes, self.dtype, name='logits')(x)
    return layers.resize_bilinear(logits.astype(jnp.float32), (height, width))


class Decoder(nn.Module):
  """v3+ decoder: upsample the ASPP output to stride 4, concatenate the 48-channel projection of the
  low-level feature, two [3x3, 256] convs."""

  low_level_channels: int = 48
  channels: int = 256
  separable: bool = True
  depthwise_impl: layers.DepthwiseImpl = 'auto'
  dtype: Any = jnp.float32
  bn: layers.BatchNormConfig = HEAD_BATCH_NORM

  @nn.compact
  def __call__(self, x: jax.Array, low_level: jax.Array, train: bool) -> jax.Array:
    projected = layers.Conv2D(self.low_level_channels, 1, bn=self.bn, dtype=self.dtype,
                              name='feature_projection0')(low_level, train)
    x = layers.resize_bilinear(x, projected.shape[1:3])
    x = jnp.concatenate([x, projected.astype(x.dtype)], axis=-1)
    for i in range(2):
      name = f'decoder_conv{i}'
      if self.separable:
        x = layers.separable_conv(x, self.channels, name, train=train, bn=self.bn,
                                  impl=self.depthwise_impl, dtype=self.dtype)[0]
      else:
        x = layers.Conv2D(self.channels, 3, bn=self.bn, dtype=self.dtype, name=name)(
            x, train)
    return x


class Logits(nn.Module):
  """`logits/semantic`: 1x1 conv with biases, no BatchNorm or activation."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.Conv2D(self.num_classes, 1, use_bn=False, relu=False, use_bias=True,
                         dtype=self.dtype,
                         kernel_init=nn.initializers.truncated_normal(0.01),
                         name='semantic')(x)
