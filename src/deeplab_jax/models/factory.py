"""`config.model` -> the DeepLab module, and what derives from the config: ASPP rates, dtypes, and
the variables' shapes.

Every default lives in `deeplab_jax.config`; these functions read the config's fields as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from deeplab_jax.errors import ConfigError
from deeplab_jax.models.backbones import BACKBONES
from deeplab_jax.models.deeplab import DeepLab

OUTPUT_STRIDES = (8, 16, 32)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def default_atrous_rates(output_stride: int) -> tuple[int, ...]:
  """6/12/18 at output stride 16, doubled at 8 and halved at 32."""
  return {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]


def atrous_rates(model_config: ml_collections.ConfigDict, output_stride: int) -> tuple[int, ...]:
  """ASPP rates at `output_stride`.

  Unset rates derive from the output stride; rates set in the config are for the training output
  stride (`model.output_stride`) and scale with it, so a model trained at OS 16 with 6/12/18 is
  evaluated at OS 8 with 12/24/36. `()` stays `()`: an ASPP without atrous branches (image pooling
  and the 1x1 branch only, the MobileNetV2 model-zoo head).
  """
  rates = model_config.atrous_rates
  if rates is None:
    return default_atrous_rates(output_stride)
  factor = model_config.output_stride / output_stride
  scaled = tuple(int(round(r * factor)) for r in rates)
  if any(r < 1 for r in scaled):
    raise ConfigError(f'config.model.atrous_rates={tuple(rates)} at config.model.output_stride='
                      f'{model_config.output_stride} become {scaled} at config.eval.output_stride='
                      f'{output_stride}; every rate must stay >= 1: raise the rates or evaluate '
                      'at a smaller output stride.')
  return scaled


def build_model(model_config: ml_collections.ConfigDict, output_stride: int | None = None,
                **overrides: Any) -> DeepLab:
  """The DeepLab module of `config.model`, at `output_stride` (default: the training one).

  Every output stride gives a module with the same parameters, so weights trained at one output
  stride evaluate at another. `overrides` replace module fields (e.g. `depthwise_impl='grouped'`).
  """
  m = model_config
  os_ = output_stride or m.output_stride
  if m.backbone not in BACKBONES:
    raise ConfigError(f'config.model.backbone={m.backbone!r} is unknown; set it to one of '
                      f'{BACKBONES}.')
  if os_ not in OUTPUT_STRIDES:
    raise ConfigError(f'output stride {os_} is not supported; set config.model.output_stride / '
                      f'config.eval.output_stride to one of {OUTPUT_STRIDES}.')
  if m.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={m.dtype!r}; use one of {tuple(DTYPES)}.")
  if m.multi_grid is not None and len(m.multi_grid) != 3:
    raise ConfigError(f'config.model.multi_grid={tuple(m.multi_grid)} must have 3 entries, one '
                      'per unit of the last block, e.g. (1, 2, 4).')
  kwargs = dict(
      backbone=m.backbone,
      num_classes=m.num_classes,
      output_stride=os_,
      atrous_rates=atrous_rates(m, os_),
      multi_grid=tuple(m.multi_grid) if m.multi_grid is not None else None,
      decoder=m.decoder,
      aspp_separable=m.aspp_separable,
      decoder_separable=m.decoder_separable,
      image_pooling=m.image_pooling,
      aspp_channels=m.aspp_channels,
      low_level_channels=m.low_level_channels,
      decoder_channels=m.decoder_channels,
      width_multiplier=m.width_multiplier,
      dropout_rate=m.dropout_rate,
      depthwise_impl=m.depthwise_impl,
      freeze_backbone_bn=m.freeze_backbone_bn,
      dtype=DTYPES[m.dtype],
      remat=m.remat,
      bn_decay=m.bn_decay,
  )
  kwargs.update(overrides)
  return DeepLab(**kwargs)


INIT_SIZE = 33  # Parameter shapes do not depend on the input size: trace on a small one.


def variable_shapes(model_config: ml_collections.ConfigDict,
                    input_size: Sequence[int] = (INIT_SIZE, INIT_SIZE)) -> dict[str, Any]:
  """`{'params', 'batch_stats'}` of the model as `jax.ShapeDtypeStruct`s; nothing is computed."""
  model = build_model(model_config)
  x = jax.ShapeDtypeStruct((1, *input_size, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
