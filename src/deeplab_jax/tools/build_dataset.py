"""Build a dataset as a TFDS dataset, once, from the archives or folder you downloaded or made.

  python -m deeplab_jax.tools.build_dataset voc --manual_dir=DIR [--data_dir=DIR]
  python -m deeplab_jax.tools.build_dataset cityscapes --manual_dir=DIR [--data_dir=DIR]
  python -m deeplab_jax.tools.build_dataset ade20k --manual_dir=DIR [--data_dir=DIR]
  python -m deeplab_jax.tools.build_dataset custom --root=ROOT --name=NAME [--data_dir=DIR] \\
      [--num_classes=N]

`voc`: DIR holds VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz; `cityscapes`:
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; `ade20k`: ADEChallengeData2016.zip;
`custom`: a folder of images/, masks/, splits/ (`deeplab_jax.datasets.custom`). A bad file stops the
build with an error naming it (exit status 1), and no partial dataset is left behind. Prints the
split sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import flags

from deeplab_jax.datasets import ade20k, cityscapes, custom, voc
from deeplab_jax.tools import app

ARCHIVE_BUILDERS = {'voc': voc, 'cityscapes': cityscapes, 'ade20k': ade20k}
DATASETS = (*ARCHIVE_BUILDERS, 'custom')


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = flag_values
  flags.DEFINE_string('manual_dir', None, 'voc, cityscapes, ade20k: folder holding the archives.',
                      flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: the TFDS default).',
                      flag_values=fv)
  flags.DEFINE_string('root', None, 'custom: folder with images/, masks/, splits/.',
                      flag_values=fv)
  flags.DEFINE_string('name', None, 'custom: TFDS dataset name (lower_snake_case).',
                      flag_values=fv)
  flags.DEFINE_integer('num_classes', None, 'custom: number of classes (default: the lines of '
                       'ROOT/classes.txt).', flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> tfds.core.DatasetBuilder:
  f = flag_values
  if len(argv) != 1 or argv[0] not in DATASETS:
    raise app.UsageError(f'Give the dataset as the one argument: one of {", ".join(DATASETS)}.')
  if argv[0] == 'custom':
    if not (f.root and f.name):
      raise app.UsageError('custom: --root=ROOT and --name=NAME are required.')
    spec = custom.build(f.name, f.root, f.data_dir, f.num_classes)
    builder = tfds.builder(f.name, data_dir=f.data_dir)
    print(f'built {spec.tfds_name} ({spec.num_classes} classes) in '
          f'{f.data_dir or "the TFDS default data_dir"}')
  else:
    if argv[0] == 'cityscapes' and not f.manual_dir:
      raise app.UsageError('cityscapes: --manual_dir=DIR is required (registration download).')
    builder = ARCHIVE_BUILDERS[argv[0]].build(f.data_dir, f.manual_dir)
  sizes = ', '.join(f'{k}: {v.num_examples}' for k, v in builder.info.splits.items())
  print(f'{builder.info.full_name} in {builder.data_dir}: {sizes}')
  return builder


run = app.runner(__name__)

if __name__ == '__main__':
  run()
