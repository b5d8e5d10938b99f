"""Export a checkpoint for serving: StableHLO, TF SavedModel (official signature) or TFLite.

  python -m deeplab_jax.tools.export --config=configs/voc_mobilenetv2.py --workdir=WORKDIR \\
      --format=stablehlo|savedmodel|tflite --output=PATH [--quantize=int8] [--check_images=N]

Reads the checkpoint `--mode=eval` reads (`config.eval.checkpoint_step` or the latest) and runs
at the config's eval output stride, scales and flip; `deeplab_jax.export` says what each format
takes and returns. Prints a JSON report (size, and with `--check_images` the agreement with the
JAX model on that many images of the eval split), also written to PATH.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from deeplab_jax import export
from deeplab_jax.tools import app


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = flag_values
  app.define_config_flag(fv, help='Config file (as for training).')
  app.define_workdir_flag(fv, help='Workdir (or checkpoints dir) with a checkpoint.')
  flags.DEFINE_enum('format', None, export.FORMATS, 'What to write.', flag_values=fv)
  flags.DEFINE_string('output', None, 'File (stablehlo, tflite) or directory (savedmodel).',
                      flag_values=fv)
  flags.DEFINE_list('platforms', list(export.PLATFORMS), 'stablehlo, savedmodel: platforms to '
                    'lower for (cpu-only artifacts use the shift-and-add depthwise conv).',
                    flag_values=fv)
  flags.DEFINE_bool('symbolic_size', True, 'stablehlo, savedmodel: any image size (else the eval '
                    'crop; the stablehlo batch stays symbolic).', flag_values=fv)
  flags.DEFINE_list('outputs', None, f'Outputs, of {", ".join(export.OUTPUTS)}; default: '
                    f'{",".join(export.DEFAULT_OUTPUTS)} (tflite: {export.PREDICTIONS}).',
                    flag_values=fv)
  flags.DEFINE_enum('quantize', 'none', export.QUANTIZATIONS, 'tflite: post-training int8 '
                    'quantization, calibrated on --representative_images of the train split.',
                    flag_values=fv)
  flags.DEFINE_integer('representative_images', 100, 'tflite int8: calibration images.',
                       flag_values=fv)
  flags.DEFINE_integer('check_images', 0, 'Compare the export with the JAX model on this many '
                       'images of the eval split.', flag_values=fv)
  flags.mark_flags_as_required(['format', 'output'], flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> dict:
  app.no_arguments(argv)
  f = flag_values
  report = export.export(f.config, f.workdir, f.format, f.output, platforms=tuple(f.platforms),
                         symbolic_size=f.symbolic_size,
                         outputs=tuple(f.outputs) if f.outputs else None, quantize=f.quantize,
                         representative_images=f.representative_images,
                         check_images=f.check_images)
  print(json.dumps(report))
  return report


run = app.runner(__name__)

if __name__ == '__main__':
  run()
