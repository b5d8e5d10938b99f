"""Pretrained weights into a deeplab_jax workdir.

  python -m deeplab_jax.tools.convert tf --checkpoint=DIR/model.ckpt --config=configs/X.py \\
      --output=OUT [--skip=REGEX ...] [--logits_classes=1:151]
  python -m deeplab_jax.tools.convert timm --model=xception65 --weights=FILE.safetensors \\
      --config=configs/X.py --output=OUT

See `deeplab_jax.convert` for what maps and how strictly. OUT then serves as `--workdir` for
evaluation and prediction and as `config.init_from`.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from deeplab_jax import checkpoint, convert
from deeplab_jax.config import get_base_config
from deeplab_jax.convert import timm as convert_timm
from deeplab_jax.tools import app

SOURCES = ('tf', 'timm')


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = flag_values
  app.define_config_flag(fv, required=False, help='Config file (configs/*.py); default: the base '
                         'config (VOC, Xception-65).')
  flags.DEFINE_string('output', None, 'Workdir to write the converted checkpoint into.',
                      flag_values=fv)
  flags.DEFINE_multi_string('skip', [], 'Regex (re.search) of variable names to leave out: matching '
                            'checkpoint variables are not used, matching model variables keep '
                            'their initialisation. Repeatable.', flag_values=fv)
  flags.DEFINE_integer('step', 0, 'Step number of the written checkpoint.', flag_values=fv)
  flags.DEFINE_string('logits_classes', None, "tf: keep only these classes of the checkpoint's "
                      'logits, START:STOP (1:151 for the official ADE20K checkpoint, whose class 0 '
                      'is the ignored "other").', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'tf: TF checkpoint prefix (DIR/model.ckpt) or directory.',
                      flag_values=fv)
  flags.DEFINE_string('model', None, 'timm: model name, e.g. xception65, resnet101s.',
                      flag_values=fv)
  flags.DEFINE_string('weights', None, 'timm: state dict file (.safetensors, or .pth/.bin read '
                      'with torch.load(weights_only=True)).', flag_values=fv)
  flags.DEFINE_list('input_mean', None, "timm: the model's input mean (RGB in [0, 1]); default: "
                    "timm's for the family.", flag_values=fv)
  flags.DEFINE_list('input_std', None, "timm: the model's input std (RGB in [0, 1]).",
                    flag_values=fv)
  flags.DEFINE_float('bn_epsilon', None, "timm: the model's BatchNorm epsilon; default: timm's "
                     'for the family.', flag_values=fv)
  flags.mark_flag_as_required('output', flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> convert.Report:
  f = flag_values
  if len(argv) != 1 or argv[0] not in SOURCES:
    raise app.UsageError(f'Give the source as the one argument: {" or ".join(SOURCES)}.')
  if f.step in checkpoint.available_steps(f.output):
    raise app.UsageError(f'{f.output} already holds checkpoint step {f.step}: pick another '
                         '--output (or --step), or delete it.')
  config = f.config if f.config is not None else get_base_config()
  if argv[0] == 'tf':
    if not f.checkpoint:
      raise app.UsageError('tf: --checkpoint=PREFIX is required.')
    classes = convert.parse_slice(f.logits_classes) if f.logits_classes else None
    variables, report = convert.convert_tf(f.checkpoint, config.model, f.skip, config.train.seed,
                                           logits_classes=classes)
  else:
    if not (f.model and f.weights):
      raise app.UsageError('timm: --model=NAME and --weights=FILE are required.')
    mean = tuple(float(v) for v in f.input_mean) if f.input_mean else None
    std = tuple(float(v) for v in f.input_std) if f.input_std else None
    variables, report = convert_timm.convert_file(
        f.weights, f.model, config.model, f.skip, config.train.seed, input_mean=mean,
        input_std=std, bn_epsilon=f.bn_epsilon)
  step_dir = convert.write(f.output, variables, report, f.step)
  print(report.summary())
  print(f'Wrote {step_dir}. Evaluate with --workdir={f.output}, or fine-tune from it with '
        f'--config.init_from={f.output}.')
  return report


run = app.runner(__name__)

if __name__ == '__main__':
  run()
