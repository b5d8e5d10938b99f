"""Config checks that run before anything is compiled: one clear message per mistake.

`validate_config(config)` raises `ConfigError` (a `ValueError`) naming the config field and the fix
for a config that cannot work: an unknown backbone, an unsupported output stride, ASPP rates that are
not positive or that were set larger than the feature map, a batch that does not split over the
devices, a `num_classes` that disagrees with the dataset, non-positive eval scales or intervals, an
unknown eval mode, a slide stride larger than the window, negative trimap widths, an
`init_from` without a checkpoint. Crop sizes not of the form `output_stride * k + 1` only log a
warning: they work, but features and labels are then not aligned the way the official models were
trained. A checkpoint that does not fit the model is found on restore (`deeplab_jax.checkpoint` reads
only its metadata), with a message naming its source.

`train.train_and_evaluate`, `evaluate.evaluate_checkpoint` and `inference.predict_images` call it
first, so a bad config fails in seconds instead of after minutes of compilation or data preparation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from deeplab_jax import checkpoint, datasets, models, sharding
from deeplab_jax.config import eval_output_stride
from deeplab_jax.errors import ConfigError

MODES = ('train_and_eval', 'train', 'eval', 'predict')


def validate_config(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                    process_count: int | None = None, mode: str = 'train_and_eval') -> None:
  """Raise `ConfigError` for the first field of `config` that cannot work in `mode`.

  `mode` is one of `MODES`: training fields are checked for the train modes, the eval batch and
  crop for the modes that evaluate, the model and the eval output stride and scales always.
  `device_count` / `process_count` default to JAX's (all processes).
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; use one of {MODES}.')
  training = mode in ('train_and_eval', 'train')
  evaluating = mode in ('train_and_eval', 'eval')
  m, e = config.model, config.eval

  if m.backbone not in models.BACKBONES:
    raise ConfigError(f'config.model.backbone={m.backbone!r} is unknown; set it to one of '
                      f'{models.BACKBONES}.')
  _check_output_stride('config.model.output_stride', m.output_stride)
  if e.output_stride is not None:
    _check_output_stride('config.eval.output_stride', e.output_stride)
  eval_os = eval_output_stride(config)
  _check_rates(m, m.output_stride)
  if eval_os != m.output_stride:
    _check_rates(m, eval_os)
  if mode != 'predict':
    dataset_spec(config)

  scales = tuple(e.scales or ())
  if not scales or any(not s > 0 for s in scales):
    raise ConfigError(f'config.eval.scales={scales} must be one or more positive factors, e.g. '
                      '(1.0,) or (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).')

  _check_eval_extras(e)

  if training:
    t = config.train
    sharding.check_batch_size('config.train.batch_size', t.batch_size,
                              devices=_devices(device_count), processes=process_count)
    _check_crop('config.train.crop_size', t.crop_size, m.output_stride)
    _check_rates_fit(m, m.output_stride, t.crop_size, 'config.train.crop_size')
    for field in ('num_steps', 'log_every', 'checkpoint_every'):
      _check_positive(f'config.train.{field}', t[field])
    if mode == 'train_and_eval':
      _check_positive('config.eval.every', e.every)
    weights = t.class_weights
    if weights is not None and len(weights) != m.num_classes:
      raise ConfigError(f'config.train.class_weights has {len(weights)} entries for '
                        f'config.model.num_classes={m.num_classes}; give one weight per class or '
                        'set it to None.')
    top_k = t.top_k_percent_pixels
    if not 0.0 < top_k <= 1.0:
      raise ConfigError(f'config.train.top_k_percent_pixels={top_k} must be in (0, 1]; 1.0 '
                        'keeps every pixel.')
    _check_init_from(config)
  if evaluating:  # Prediction pads each image to its own size: no crop to fit.
    sharding.check_batch_size('config.eval.batch_size', e.batch_size,
                              devices=_devices(device_count), processes=process_count)
    _check_crop('config.eval.crop_size', e.crop_size, eval_os)
    _check_rates_fit(m, eval_os, e.crop_size, 'config.eval.crop_size')


EVAL_MODES = ('whole', 'slide')


def _check_eval_extras(e: ml_collections.ConfigDict) -> None:
  """Slide mode, trimap widths and the expected figures."""
  if e.mode not in EVAL_MODES:
    raise ConfigError(f"config.eval.mode={e.mode!r}; use 'whole' (each image padded to "
                      "config.eval.crop_size) or 'slide' (windows of config.eval.crop_size).")
  if e.stride is not None:
    stride, window = tuple(e.stride), tuple(e.crop_size)[:2]
    if (len(stride) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0
                                for s in stride)
        or any(s > w for s, w in zip(stride, window, strict=False))):
      raise ConfigError(f'config.eval.stride={stride} must be (height, width), positive '
                        f'integers no larger than the window config.eval.crop_size={window} '
                        '(windows further apart would leave pixels out), or None for 2/3 of '
                        'the window.')
  widths = tuple(e.trimap_widths or ())
  if any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in widths):
    raise ConfigError(f'config.eval.trimap_widths={widths} must be band widths in pixels '
                      '(integers >= 0), e.g. (1, 2, 4, 8, 16, 24, 32, 40), or () for none.')
  expected = e.expected_miou
  if expected is not None and not 0.0 <= expected <= 1.0:
    raise ConfigError(f'config.eval.expected_miou={expected} must be an mIoU in [0, 1] (e.g. '
                      '0.822 for 82.2%), or None.')


def _devices(device_count: int | None) -> int:
  return jax.device_count() if device_count is None else int(device_count)


def _check_output_stride(field: str, value: object) -> None:
  if value not in models.OUTPUT_STRIDES:
    raise ConfigError(f'{field}={value!r} is not supported; set it to one of '
                      f'{models.OUTPUT_STRIDES}.')


def _check_positive(field: str, value: object) -> None:
  if not isinstance(value, int) or value <= 0:
    raise ConfigError(f'{field}={value!r} must be a positive integer.')


def _check_rates(m: ml_collections.ConfigDict, output_stride: int) -> None:
  """Rates set in the config must be positive, also once scaled to `output_stride`; `()` (no
  atrous branches, the MobileNetV2 model-zoo head) is fine."""
  if m.atrous_rates is None:
    return
  rates = tuple(m.atrous_rates)
  if any(not isinstance(r, int) or r < 1 for r in rates):
    raise ConfigError(f'config.model.atrous_rates={rates} must be positive integers (the ASPP '
                      'dilation rates at config.model.output_stride, e.g. (6, 12, 18) at 16), () '
                      'for no atrous branches, or None for the defaults of the output stride.')
  models.atrous_rates(m, output_stride)  # Raises when a scaled rate falls below 1.


def _check_rates_fit(m: ml_collections.ConfigDict, output_stride: int, crop_size: Sequence[int],
                     crop_field: str) -> None:
  """A 3x3 ASPP tap at rate r >= the feature map's size only ever reads padding (a 1x1 conv).

  Rates the config sets that way are an error; the output stride's default rates (chosen for
  513x513 crops) only warn, since small crops for tests and smoke runs use them on purpose.
  """
  feature = min(math.ceil(int(c) / output_stride) for c in tuple(crop_size)[:2])
  rates = models.atrous_rates(m, output_stride)
  too_big = [r for r in rates if r >= feature]
  if not too_big:
    return
  message = (f'ASPP rates {rates} at output stride {output_stride} do not fit {crop_field}='
             f'{tuple(crop_size)}: its feature map is {feature} pixels wide, so the 3x3 taps at rate(s) '
             f'{too_big} fall entirely in padding (those branches act as 1x1 convs).')
  if m.atrous_rates is not None:
    raise ConfigError(f'{message} Fix: set config.model.atrous_rates to rates below {feature} '
                      f'(at output stride {output_stride}) or raise {crop_field}.')
  logging.warning('%s Set config.model.atrous_rates (below %d) or a larger crop if that is not '
                  'intended.', message, feature)


def _check_crop(field: str, crop_size: Sequence[int], output_stride: int) -> None:
  crop = tuple(crop_size)
  if len(crop) != 2 or any(not isinstance(c, int) or c <= 0 for c in crop):
    raise ConfigError(f'{field}={crop} must be (height, width), positive integers, e.g. '
                      '(513, 513).')
  if any((c - 1) % output_stride for c in crop):
    good = tuple(max(1, math.ceil((c - 1) / output_stride)) * output_stride + 1 for c in crop)
    logging.warning('%s=%s is not of the form output_stride * k + 1 (output stride %d): features '
                    'and labels are not aligned as in the official models; e.g. %s fits.',
                    field, crop, output_stride, good)


def dataset_spec(config: ml_collections.ConfigDict) -> datasets.DatasetSpec:
  """The spec of `config.data.dataset`; ConfigError for an unknown dataset or a `num_classes` that
  disagrees with it."""
  d = config.data
  try:
    spec = datasets.get_spec(d.dataset, d.data_dir)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  num_classes = config.model.num_classes
  if num_classes != spec.num_classes:
    raise ConfigError(f'config.model.num_classes={num_classes} but dataset {d.dataset!r} has '
                      f'{spec.num_classes} classes; set config.model.num_classes='
                      f'{spec.num_classes}.')
  return spec


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  source = config.init_from
  if not source:
    return
  if not checkpoint.available_steps(source) and not checkpoint.is_step_dir(source):
    raise ConfigError(f'config.init_from={source!r} holds no checkpoint (no finished step '
                      f'directory in {checkpoint.checkpoint_dir(source)!r}); point it at a workdir '
                      'or checkpoints directory that has one (e.g. written by deeplab_jax.convert), '
                      'or set it to None.')
