"""DeepLab v3+ networks: `build_model` turns `config.model` into a Flax module."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from deeplab_jax.models.deeplab import (
    BACKBONES,
    OUTPUT_STRIDES,
    DeepLab,
    backbone_scope,
    build_backbone,
    default_atrous_rates,
    mean_pixel,
    preprocess,
)

__all__ = ['BACKBONES', 'OUTPUT_STRIDES', 'DeepLab', 'atrous_rates', 'backbone_scope',
           'build_backbone', 'build_model', 'default_atrous_rates', 'mean_pixel', 'preprocess']

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def atrous_rates(model_config: ml_collections.ConfigDict, output_stride: int) -> tuple[int, ...]:
  """ASPP rates at `output_stride`.

  Unset rates derive from the output stride; rates set in the config are for the training output
  stride (`model.output_stride`) and scale with it, so a model trained at OS 16 with 6/12/18 is
  evaluated at OS 8 with 12/24/36.
  """
  rates = model_config.get('atrous_rates')
  if rates is None:
    return default_atrous_rates(output_stride)
  factor = model_config.output_stride / output_stride
  scaled = tuple(int(round(r * factor)) for r in rates)
  if any(r < 1 for r in scaled):
    raise ValueError(f'config.model.atrous_rates={tuple(rates)} for output stride '
                     f'{model_config.output_stride} gives rates {scaled} at output stride '
                     f'{output_stride}; every rate must be >= 1.')
  return scaled


def build_model(model_config: ml_collections.ConfigDict, output_stride: int | None = None,
                **overrides) -> DeepLab:
  """The DeepLab module of `config.model`, at `output_stride` (default: the training one).

  Every output stride gives a module with the same parameters, so weights trained at one output
  stride evaluate at another.
  """
  m = model_config
  os_ = output_stride or m.output_stride
  if m.backbone not in BACKBONES:
    raise ValueError(f'config.model.backbone={m.backbone!r} is unknown; choose one of {BACKBONES}.')
  if os_ not in OUTPUT_STRIDES:
    raise ValueError(f'output stride {os_} is not supported; set config.model.output_stride / '
                     f'config.eval.output_stride to one of {OUTPUT_STRIDES}.')
  if m.get('dtype', 'float32') not in DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r}; use 'float32' or 'bfloat16'.")
  multi_grid = m.get('multi_grid')
  if multi_grid is not None and len(multi_grid) != 3:
    raise ValueError(f'config.model.multi_grid={tuple(multi_grid)} must have 3 entries, one per '
                     'unit of the last block, e.g. (1, 2, 4).')
  kwargs = dict(
      backbone=m.backbone,
      num_classes=m.num_classes,
      output_stride=os_,
      atrous_rates=atrous_rates(m, os_),
      multi_grid=tuple(multi_grid) if multi_grid is not None else None,
      decoder=m.decoder,
      aspp_separable=m.aspp_separable,
      decoder_separable=m.decoder_separable,
      image_pooling=m.get('image_pooling', True),
      aspp_channels=m.get('aspp_channels', 256),
      low_level_channels=m.get('low_level_channels', 48),
      decoder_channels=m.get('decoder_channels', 256),
      width_multiplier=m.get('width_multiplier', 1.0),
      dropout_rate=m.get('dropout_rate', 0.1),
      depthwise_impl=m.get('depthwise_impl', 'auto'),
      freeze_backbone_bn=m.get('freeze_backbone_bn', False),
      dtype=DTYPES[m.get('dtype', 'float32')],
      remat=m.get('remat', False),
      bn_decay=m.get('bn_decay'),
  )
  kwargs.update(overrides)
  return DeepLab(**kwargs)
