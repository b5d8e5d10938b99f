"""Check that a checkpoint reaches the mIoU its config should give.

  python -m deeplab_jax.tools.reproduce --config=configs/voc_xception.py --workdir=DIR \\
      [--expect=MIOU] [--tolerance=T] [--config.eval.output_stride=8 ...]

Evaluates the latest (or `--config.eval.checkpoint_step=N`) checkpoint of DIR with the config's
eval setting, as `--mode=eval` does, prints a table of ours against the reference (mIoU, and per
class where the reference has them) and exits with status 1 when the mIoU is more than T (default
0.01, one point) from the reference: `--expect`, else the config's `config.eval.expected_miou`
(`deeplab_jax.reproduce`).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from deeplab_jax import reproduce
from deeplab_jax.tools import app


def define_flags(flag_values: flags.FlagValues) -> None:
  app.define_config_flag(flag_values, help='Config file whose eval setting to reproduce.')
  app.define_workdir_flag(flag_values, help='Workdir (or checkpoints dir) with the checkpoint.')
  flags.DEFINE_float('expect', None, 'Expected mIoU in [0, 1]; default: '
                     'config.eval.expected_miou.', flag_values=flag_values)
  flags.DEFINE_float('tolerance', reproduce.DEFAULT_TOLERANCE,
                     'Largest accepted |ours - expected| in mIoU.', flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> int:
  app.no_arguments(argv)
  f = flag_values
  title = (f"Reproduction check: {config_flags.get_config_filename(f['config'])} on "
           f"{f.workdir}")
  comparison = reproduce.reproduce(f.config, f.workdir, f.expect, f.tolerance, title=title)
  print(comparison.table, flush=True)
  if not comparison.ok:
    logging.error('mIoU %.4f is outside the tolerance of the reference (table above).',
                  comparison.result['miou'])
  return 0 if comparison.ok else 1


run = app.runner(__name__)

if __name__ == '__main__':
  run()
