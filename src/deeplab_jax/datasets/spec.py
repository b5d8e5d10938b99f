"""What the input pipeline needs to know about a TFDS segmentation dataset."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A TFDS dataset as DeepLab reads it.

  `label_map` (256 entries, uint8) maps stored mask values to training labels (class ids, or 255 for
  ignore), e.g. Cityscapes labelIds -> trainIds; None keeps the stored values.
  """

  tfds_name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_key: str = 'image'
  label_key: str = 'segmentation_mask'
  train_split: str = 'train'
  eval_split: str = 'validation'
  label_map: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(f'{self.tfds_name}: {len(self.class_names)} class names for '
                       f'{self.num_classes} classes.')


_SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
  """Make `spec` known to `get_spec` (each dataset module registers its own at import)."""
  _SPECS[spec.tfds_name] = spec
  return spec


def get_spec(name: str, data_dir: str | None = None) -> DatasetSpec:
  """The spec of TFDS dataset `name` (the part before any ':version' or '/config').

  A name no dataset module registered may be a custom dataset built into `data_dir`: its spec is
  read from the dataset's stored metadata (see `deeplab_jax.datasets.custom`).
  """
  base = name.split(':')[0].split('/')[0]
  if base not in _SPECS:
    from deeplab_jax.datasets import custom  # noqa: PLC0415  (custom imports this module)
    spec = custom.stored_spec(name, data_dir)
    if spec is not None:
      return register(spec)
    raise ValueError(f'config.data.dataset={name!r} is not a dataset deeplab_jax knows; known: '
                     f'{sorted(_SPECS)}. For your own images and masks see '
                     '`deeplab_jax.datasets.custom`.')
  return _SPECS[base]


def prepare(name: str, data_dir: str | None, manual_dir: str | None):
  """Build TFDS dataset `name` into `data_dir` from the archives in `manual_dir` (never from GCS)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy: only the build commands need it)

  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


def build_main(argv: Sequence[str] | None, *, name: str, manual_dir_help: str,
               build: Callable[[str | None, str | None], object],
               errors: tuple[type[Exception], ...], manual_dir_required: bool = False) -> int:
  """`python -m deeplab_jax.datasets.<module> --manual_dir=DIR [--data_dir=DIR]`: build dataset
  `name` with `build(data_dir, manual_dir)`; prints the split sizes, or the error (exit status 1)."""
  parser = argparse.ArgumentParser(prog=f'python -m {build.__module__}',
                                   description=f'Build the TFDS dataset {name}.')
  parser.add_argument('--manual_dir', default=None, required=manual_dir_required,
                      help=manual_dir_help)
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default: TFDS default)')
  args = parser.parse_args(argv)
  try:
    builder = build(args.data_dir, args.manual_dir)
  except errors as e:
    print(f'build failed, nothing written: {e}', file=sys.stderr)
    return 1
  sizes = ', '.join(f'{k}: {v.num_examples}' for k, v in builder.info.splits.items())
  print(f'{name} in {builder.data_dir}: {sizes}')
  return 0
