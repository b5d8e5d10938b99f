"""Time the training input pipeline: `python -m deeplab_jax.tools.input_throughput --config=CONFIG`.

Prints one JSON object: images per second of `input_pipeline.create_train_iterator` over `--batches`
batches after one warm-up batch (decode, augmentation, batching; no model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags

from deeplab_jax import input_pipeline
from deeplab_jax.models import preprocessing
from deeplab_jax.tools import app


def measure_throughput(config: ml_collections.ConfigDict, num_batches: int) -> dict[str, Any]:
  """Images per second of the training pipeline after one warm-up batch."""
  iterator = input_pipeline.create_train_iterator(
      config, mean_pixel=preprocessing.mean_pixel(config.model.backbone))
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  images = num_batches * config.train.batch_size
  return {'dataset': config.data.dataset, 'batch_size': config.train.batch_size,
          'crop_size': list(config.train.crop_size), 'batches': num_batches,
          'seconds': round(seconds, 3), 'images_per_s': round(images / seconds, 1)}


def define_flags(flag_values: flags.FlagValues) -> None:
  app.define_config_flag(flag_values)
  flags.DEFINE_integer('batches', 50, 'Batches to time after one warm-up batch.', lower_bound=1,
                       flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> dict[str, Any]:
  app.no_arguments(argv)
  result = measure_throughput(flag_values.config, flag_values.batches)
  print(json.dumps(result))
  return result


run = app.runner(__name__)

if __name__ == '__main__':
  run()
