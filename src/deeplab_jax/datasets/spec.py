"""What the input pipeline needs to know about a TFDS segmentation dataset."""

from __future__ import annotations

import dataclasses

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
