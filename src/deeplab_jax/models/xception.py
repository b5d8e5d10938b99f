"""Modified aligned Xception-41/65/71 (DeepLab v3+ Sec. 3.2), named as the official TF checkpoints.

Every max-pool of the original Xception is a strided separable conv, and BatchNorm follows every
depthwise and pointwise conv. As in the official code, a ReLU comes before each separable conv of a
module (no activation inside it), except in the exit flow's last module, which has ReLU after each
BatchNorm instead. The stride of a module is in its third separable conv.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers, scopes


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  flow: str  # 'entry_flow' | 'middle_flow' | 'exit_flow'
  name: str  # 'block1', ...
  depths: tuple[int, int, int]
  skip: Literal['conv', 'sum', 'none']  # 1x1 projection shortcut, identity, or no shortcut.
  num_units: int
  stride: int
  activation_inside: bool = False
  multi_grid: bool = False  # Unit rates of the three separable convs come from `multi_grid`.


def _entry(depths_strides: list[tuple[int, int]]) -> list[BlockSpec]:
  return [BlockSpec('entry_flow', f'block{i + 1}', (d, d, d), 'conv', 1, s)
          for i, (d, s) in enumerate(depths_strides)]


def _middle_exit(middle_units: int) -> list[BlockSpec]:
  return [
      BlockSpec('middle_flow', 'block1', (728, 728, 728), 'sum', middle_units, 1),
      BlockSpec('exit_flow', 'block1', (728, 1024, 1024), 'conv', 1, 2),
      BlockSpec('exit_flow', 'block2', (1536, 1536, 2048), 'none', 1, 1, activation_inside=True,
                multi_grid=True),
  ]


ARCHITECTURES: dict[str, list[BlockSpec]] = {
    'xception_41': _entry([(128, 2), (256, 2), (728, 2)]) + _middle_exit(8),
    'xception_65': _entry([(128, 2), (256, 2), (728, 2)]) + _middle_exit(16),
    'xception_71': _entry([(128, 2), (256, 1), (256, 2), (728, 1), (728, 2)]) + _middle_exit(16),
}
ROOT_STRIDE = 2
BATCH_NORM = layers.BatchNormConfig(decay=0.9997, epsilon=1e-3)
DEFAULT_MULTI_GRID = (1, 1, 1)


class XceptionModule(nn.Module):
  """Three separable convs (stride in the third) plus a conv, identity or no shortcut.

  Returns the output and the second pointwise conv's BatchNorm output (the decoder's end point).
  """

  depths: tuple[int, int, int]
  skip: Literal['conv', 'sum', 'none']
  stride: int
  rates: tuple[int, int, int]
  activation_inside: bool
  bn: layers.BatchNormConfig
  depthwise_impl: layers.DepthwiseImpl
  dtype: Any

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    x = inputs
    end_point = None
    for i in range(3):
      x = layers.separable_conv(
          x, self.depths[i], f'separable_conv{i + 1}', train=train,
          stride=self.stride if i == 2 else 1, rate=self.rates[i],
          activation=nn.relu if self.activation_inside else None,
          pre_activation=None if self.activation_inside else nn.relu,
          bn=self.bn, impl=self.depthwise_impl, dtype=self.dtype)
      if i == 1:
        end_point = x
    if self.skip == 'conv':
      shortcut = layers.ConvBN(self.depths[-1], 1, stride=self.stride, activation=None,
                               bn=self.bn, dtype=self.dtype, name='shortcut')(inputs, train)
      x = x + shortcut
    elif self.skip == 'sum':
      x = x + inputs
    return x, end_point


class _Flow(nn.Module):
  """The `entry_flow` / `middle_flow` / `exit_flow` scope; the entry flow also holds the stem."""

  blocks: tuple[tuple[str, tuple[dict, ...]], ...]  # (block name, unit module fields)
  stem_depths: tuple[int, int] | None
  bn: layers.BatchNormConfig
  dtype: Any
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array | None, list]:
    stem = None
    if self.stem_depths is not None:
      x = layers.ConvBN(self.stem_depths[0], 3, stride=2, bn=self.bn, dtype=self.dtype,
                        name='conv1_1')(x, train)
      x = layers.ConvBN(self.stem_depths[1], 3, bn=self.bn, dtype=self.dtype,
                        name='conv1_2')(x, train)
      stem = x
    outputs = []
    for name, units in self.blocks:
      block_out = scopes.Block(XceptionModule, 'xception_module', units, self.remat,
                               name=name)(x, train)
      x = block_out[-1][0]
      outputs.extend(block_out)
    return stem, outputs


class Xception(nn.Module):
  """Aligned Xception backbone; returns `scopes.Features`.

  The decoder's end point is the second pointwise conv's BatchNorm output in the unit that goes from
  stride 4 to 8 (`entry_flow/block2/.../separable_conv2_pointwise` for Xception-65), as in the
  official code.
  """

  architecture: str = 'xception_65'
  output_stride: int = 16
  multi_grid: tuple[int, int, int] = DEFAULT_MULTI_GRID
  width_multiplier: float = 1.0
  depthwise_impl: layers.DepthwiseImpl = 'auto'
  bn: layers.BatchNormConfig = BATCH_NORM
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> scopes.Features:
    blocks = ARCHITECTURES[self.architecture]
    plan = layers.atrous_plan([[b.stride] * b.num_units for b in blocks], self.output_stride,
                              ROOT_STRIDE)
    width = functools.partial(layers.scaled_depth, multiplier=self.width_multiplier)
    flows: dict[str, list] = {}
    unit_strides = []
    for block, block_plan in zip(blocks, plan, strict=True):
      units = []
      for unit_stride, rate in block_plan:
        rates = tuple(rate * m for m in self.multi_grid) if block.multi_grid else (rate,) * 3
        units.append(dict(depths=tuple(width(d) for d in block.depths), skip=block.skip,
                          stride=unit_stride, rates=rates,
                          activation_inside=block.activation_inside, bn=self.bn,
                          depthwise_impl=self.depthwise_impl, dtype=self.dtype))
        unit_strides.append(unit_stride)
      flows.setdefault(block.flow, []).append((block.name, tuple(units)))

    outputs = []
    stem = None
    for flow in ('entry_flow', 'middle_flow', 'exit_flow'):
      stem_depths = (width(32), width(64)) if flow == 'entry_flow' else None
      flow_stem, flow_out = _Flow(tuple(flows[flow]), stem_depths, self.bn, self.dtype,
                                  self.remat, name=flow)(x, train)
      stem = flow_stem if flow_stem is not None else stem
      outputs.extend(flow_out)
      x = flow_out[-1][0]

    stride = ROOT_STRIDE
    by_stride = {stride: stem}
    decoder = None
    for (out, end_point), unit_stride in zip(outputs, unit_strides, strict=True):
      if stride == 4 and unit_stride == 2:
        decoder = end_point
      stride *= unit_stride
      by_stride[stride] = out
    return scopes.Features(by_stride, decoder)
