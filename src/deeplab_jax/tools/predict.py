"""Segment images with a trained checkpoint.

  python -m deeplab_jax.tools.predict --config=configs/shapes.py --workdir=/tmp/wd \\
      --input=IMAGE_OR_DIR --output=OUT [--save_logits]

Writes `<stem>.png` (label map as a VOC-palette PNG), `<stem>_overlay.png` and, with
`--save_logits`, `<stem>_logits.npy` per image, with the evaluator's output stride, scales and flip
(`inference.predict_images`). Paths may be URLs.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging

from deeplab_jax import inference
from deeplab_jax.tools import app


def define_flags(flag_values: flags.FlagValues) -> None:
  app.define_config_flag(flag_values, help='Config file (as for training).')
  app.define_workdir_flag(flag_values, help='Workdir (or checkpoints dir) with a checkpoint.')
  flags.DEFINE_string('input', None, 'An image file or a directory of images.',
                      flag_values=flag_values)
  flags.DEFINE_string('output', None, 'Directory for the outputs.', flag_values=flag_values)
  flags.DEFINE_bool('save_logits', False, 'Also write <stem>_logits.npy.', flag_values=flag_values)
  flags.mark_flags_as_required(['input', 'output'], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  app.no_arguments(argv)
  f = flag_values
  written = inference.predict_images(f.config, f.workdir, f.input, f.output, f.save_logits)
  logging.info('Wrote %d files to %s.', len(written), f.output)
  return written


run = app.runner(__name__)

if __name__ == '__main__':
  run()
