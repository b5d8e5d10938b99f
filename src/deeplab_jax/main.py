"""The main job: train and evaluate DeepLab v3+.

  python -m deeplab_jax.main --config=configs/shapes.py --workdir=/tmp/wd \\
      [--mode=train_and_eval|train|eval] [--config.optim.base_lr=0.01 ...]

`train_and_eval` (default) trains, evaluating every `config.eval.every` steps and at the end; `train`
only trains; `eval` evaluates the latest (or `config.eval.checkpoint_step`) checkpoint of the
workdir. A rerun with the same workdir resumes training. `--config.smoke=True` shrinks any config
for a quick local run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deeplab_jax import distributed, evaluate, train, validate

MODES = ('train_and_eval', 'train', 'eval')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/shapes.py; override fields with --config.x.y=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval', MODES, 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])
distributed.define_flags()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize_from_flags()  # Before anything touches a device (multi-host jobs).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # tf.data runs on the CPU; keep TensorFlow away from accelerators JAX uses.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')

  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  config = train.apply_smoke(_CONFIG.value)
  if _MODE.value == 'eval':
    validate.validate_config(config, mode='eval')  # Training validates in train_and_evaluate.
    result = evaluate.evaluate_checkpoint(config, _WORKDIR.value)
    logging.info('mIoU %.4f at step %d', result['miou'], result['step'])
  else:
    train.train_and_evaluate(config, _WORKDIR.value, run_eval=_MODE.value == 'train_and_eval')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
