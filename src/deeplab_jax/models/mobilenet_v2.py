"""MobileNetV2 (Sandler et al., CVPR 2018) as the official DeepLab feature extractor builds it.

TF-slim `mobilenet_v2.mobilenet_base` with DeepLab's settings: a 3x3 stride-2 conv (`Conv`) and 17
inverted residual blocks (`expanded_conv`, `expanded_conv_1`, ..., `expanded_conv_16`: 1x1 `expand`,
3x3 `depthwise`, linear 1x1 `project`), ReLU6 after every conv but the projection, TF 'SAME' padding
everywhere (no explicit fixed padding), BatchNorm decay 0.997 and epsilon 1e-3, and the 1x1 conv to
1280 channels left out (the backbone ends at `layer_18`, 320 channels). The output stride follows
`mobilenet_base`'s rule: once the feature map reaches it, layers run at stride 1 and only the
depthwise convs dilate. The depth multiplier rounds channels as the official wrapper does: to a
multiple of 8 at 1.0 and to whole channels otherwise (`divisible_by = 8 if dm == 1 else 1`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers, scopes

SCOPE = 'MobilenetV2'
ROOT_STRIDE = 2
BATCH_NORM = layers.BatchNormConfig(decay=0.997, epsilon=1e-3)
STEM_DEPTH = 32
EXPANSION = 6


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One `expanded_conv` of the official V2_DEF: output channels, stride and expansion factor."""

  depth: int
  stride: int
  expansion: int = EXPANSION


# layer_2 .. layer_18: (depth, stride) per block; the first one does not expand (factor 1).
BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(16, 1, expansion=1),
    *(BlockSpec(24, s) for s in (2, 1)),
    *(BlockSpec(32, s) for s in (2, 1, 1)),
    *(BlockSpec(64, s) for s in (2, 1, 1, 1)),
    *(BlockSpec(96, 1) for _ in range(3)),
    *(BlockSpec(160, s) for s in (2, 1, 1)),
    BlockSpec(320, 1),
)


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
  """slim mobilenet's `_make_divisible`: the nearest multiple of `divisor`, at most 10% down."""
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return int(rounded)


def scaled_depth(depth: int, multiplier: float) -> int:
  """A layer's output channels at depth multiplier `multiplier`, as DeepLab's `_mobilenet_v2`."""
  divisor = 8 if multiplier == 1.0 else 1
  return make_divisible(depth * multiplier, divisor, divisor)


def expansion_depth(in_depth: int, factor: int) -> int:
  """`expand_input_by_factor`: a block's inner channels (factor 1 keeps them as they are)."""
  return make_divisible(in_depth * factor, 1 if factor == 1 else 8)


def block_fields(multiplier: float, output_stride: int) -> list[dict[str, Any]]:
  """in/expansion/out channels, stride and depthwise rate of every `expanded_conv`."""
  plan = layers.atrous_plan([[b.stride] for b in BLOCKS], output_stride, ROOT_STRIDE)
  fields = []
  depth = scaled_depth(STEM_DEPTH, multiplier)
  for block, [(stride, rate)] in zip(BLOCKS, plan, strict=True):
    out = scaled_depth(block.depth, multiplier)
    fields.append(dict(expansion=expansion_depth(depth, block.expansion), depth=out,
                       stride=stride, rate=rate))
    depth = out
  return fields


def block_name(index: int) -> str:
  """`expanded_conv`, `expanded_conv_1`, ...: TF's unique scope name of 0-based block `index`."""
  return 'expanded_conv' if index == 0 else f'expanded_conv_{index}'


class ExpandedConv(nn.Module):
  """`expanded_conv`: 1x1 `expand` (only when it widens) -> 3x3 `depthwise` -> linear 1x1 `project`,
  plus the input when the stride is 1 and the channels match.

  Returns the output and `depthwise_output` (the depthwise conv after BatchNorm and ReLU6).
  """

  expansion: int
  depth: int
  stride: int
  rate: int
  bn: layers.BatchNormConfig
  depthwise_impl: layers.DepthwiseImpl
  dtype: Any

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    x = inputs
    if self.expansion > inputs.shape[-1]:
      x = layers.ConvBN(self.expansion, 1, activation=jax.nn.relu6, bn=self.bn, dtype=self.dtype,
                        name='expand')(x, train)
    x = layers.DepthwiseConvBN(3, self.stride, self.rate, activation=jax.nn.relu6, bn=self.bn,
                               explicit_padding=False, impl=self.depthwise_impl,
                               dtype=self.dtype, name='depthwise')(x, train)
    depthwise_output = x
    x = layers.ConvBN(self.depth, 1, activation=None, bn=self.bn, dtype=self.dtype,
                      name='project')(x, train)
    if self.stride == 1 and x.shape[-1] == inputs.shape[-1]:
      x = x + inputs.astype(x.dtype)
    return x, depthwise_output


class MobileNetV2(nn.Module):
  """MobileNetV2 backbone (`MobilenetV2/...` names); returns `scopes.Features`.

  `width_multiplier` is the official depth multiplier (1.0 and 0.5 for the model-zoo checkpoints).
  The decoder's end point is `layer_4/depthwise_output` (stride 4), the official one.
  """

  architecture: str = 'mobilenet_v2'
  output_stride: int = 16
  width_multiplier: float = 1.0
  depthwise_impl: layers.DepthwiseImpl = 'auto'
  bn: layers.BatchNormConfig = BATCH_NORM
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> scopes.Features:
    x = layers.ConvBN(scaled_depth(STEM_DEPTH, self.width_multiplier), 3, stride=ROOT_STRIDE,
                      activation=jax.nn.relu6, bn=self.bn, explicit_padding=False,
                      dtype=self.dtype, name='Conv')(x, train)
    stride = ROOT_STRIDE
    by_stride = {stride: x}
    decoder = None
    block_cls = nn.remat(ExpandedConv, static_argnums=(2,)) if self.remat else ExpandedConv
    for i, fields in enumerate(block_fields(self.width_multiplier, self.output_stride)):
      x, depthwise_output = block_cls(**fields, bn=self.bn, depthwise_impl=self.depthwise_impl,
                                      dtype=self.dtype, name=block_name(i))(x, train)
      stride *= fields['stride']
      by_stride[stride] = x
      if i == 2:  # layer_4 = expanded_conv_2.
        decoder = depthwise_output
    return scopes.Features(by_stride, decoder)
