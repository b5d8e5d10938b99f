"""The main job: train and evaluate DeepLab v3+.

  python -m deeplab_jax.main --config=configs/shapes.py --workdir=/tmp/wd \\
      [--mode=train_and_eval|train|eval] [--config.optim.base_lr=0.01 ...]

`train_and_eval` (default) trains, evaluating every `config.eval.every` steps and at the end; `train`
only trains; `eval` evaluates the latest (or `config.eval.checkpoint_step`) checkpoint of the
workdir. A rerun with the same workdir resumes training. `--config.smoke=True` shrinks any config
for a quick local run. Multi-process jobs add `--coordinator_address`, `--num_processes` and
`--process_id` (or nothing, on Cloud TPU pods and under SLURM). This file is only wiring: the logic
is in `deeplab_jax.train` and `deeplab_jax.evaluate`, which tests and notebooks call directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import flags, logging

from deeplab_jax import distributed, evaluate, train
from deeplab_jax.tools import app

MODES = ('train_and_eval', 'train', 'eval')


def define_flags(flag_values: flags.FlagValues) -> None:
  app.define_config_flag(flag_values)
  app.define_workdir_flag(flag_values)
  flags.DEFINE_enum('mode', 'train_and_eval', MODES, 'What to run.', flag_values=flag_values)
  distributed.define_flags(flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> None:
  app.no_arguments(argv)
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  config, workdir = flag_values.config, flag_values.workdir
  if flag_values.mode == 'eval':
    result = evaluate.evaluate_checkpoint(config, workdir)
    logging.info('mIoU %.4f at step %d', result['miou'], result['step'])
  else:
    train.train_and_evaluate(config, workdir, run_eval=flag_values.mode == 'train_and_eval')


run = app.runner(__name__)

if __name__ == '__main__':
  run()
