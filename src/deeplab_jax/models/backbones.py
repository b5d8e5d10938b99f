"""The backbones by name: which module builds each, its TF scope and its BatchNorm settings.

`config.model.backbone` names one of `BACKBONES`; `build_backbone` returns the Flax module, whose
`apply` gives `scopes.Features`: features by stride plus the decoder's end point.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deeplab_jax.models import layers, mobilenet_v2, resnet, xception

BACKBONES = ('xception_41', 'xception_65', 'xception_71', 'resnet_v1_50', 'resnet_v1_101',
             'resnet_v1_50_beta', 'resnet_v1_101_beta', 'mobilenet_v2')


def backbone_scope(backbone: str) -> str:
  """The TF scope (and Flax module name) of a backbone."""
  if backbone == 'mobilenet_v2':
    return mobilenet_v2.SCOPE
  return resnet.scope_name(backbone) if backbone.startswith('resnet') else backbone


def backbone_batch_norm(backbone: str) -> layers.BatchNormConfig:
  """The backbone's official BatchNorm decay and epsilon."""
  if backbone == 'mobilenet_v2':
    return mobilenet_v2.BATCH_NORM
  return xception.BATCH_NORM if backbone.startswith('xception') else resnet.BATCH_NORM


def build_backbone(backbone: str, output_stride: int = 16,
                   multi_grid: tuple[int, int, int] | None = None, width_multiplier: float = 1.0,
                   depthwise_impl: layers.DepthwiseImpl = 'auto', freeze_bn: bool = False,
                   dtype: Any = jnp.float32, remat: bool = False, bn_decay: float | None = None,
                   name: str | None = None, fold_bn: bool = False,
                   bn_axis_name: str | None = None) -> nn.Module:
  """The backbone module: `apply` returns `scopes.Features`.

  `multi_grid` None takes the backbone's default (Xception (1, 1, 1), ResNet (1, 2, 4); MobileNetV2
  has none); `width_multiplier` is MobileNetV2's depth multiplier (with its official rounding) and
  scales the other backbones' widths; `bn_decay` overrides the backbone's official BatchNorm decay
  (0.9997 Xception, 0.95 ResNet, 0.997 MobileNetV2); `fold_bn` and `bn_axis_name` are
  `layers.BatchNormConfig`'s `folded` and `axis_name`.
  """
  bn = backbone_batch_norm(backbone)
  bn = layers.BatchNormConfig(bn.decay if bn_decay is None else bn_decay, bn.epsilon,
                              frozen=freeze_bn, folded=fold_bn, axis_name=bn_axis_name)
  common = dict(architecture=backbone, output_stride=output_stride,
                width_multiplier=width_multiplier, bn=bn, dtype=dtype, remat=remat, name=name)
  if backbone == 'mobilenet_v2':
    return mobilenet_v2.MobileNetV2(depthwise_impl=depthwise_impl, **common)
  if backbone.startswith('xception'):
    return xception.Xception(multi_grid=tuple(multi_grid or xception.DEFAULT_MULTI_GRID),
                             depthwise_impl=depthwise_impl, **common)
  if backbone in BACKBONES:
    return resnet.ResNet(multi_grid=tuple(multi_grid or resnet.DEFAULT_MULTI_GRID), **common)
  raise ValueError(f'Unknown backbone {backbone!r}; choose one of {BACKBONES}.')
