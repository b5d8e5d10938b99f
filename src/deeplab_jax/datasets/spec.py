"""What the input pipeline needs to know about a TFDS segmentation dataset, and where to find it.

`get_spec(name)` returns the `DatasetSpec` of a dataset: one of this package's (its module is
imported on first use, which also registers its TFDS builder), one registered with `register`, or
a custom dataset built into `data_dir` (its spec is read from the stored metadata).
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

IGNORE_LABEL = 255  # Label of pixels that count in neither the loss nor the metrics.

# Dataset name -> the module that registers its spec (and its TFDS builder, except TFDS's own).
_MODULES = {
    'deeplab_shapes': 'deeplab_jax.datasets.shapes',
    'voc2012_segmentation': 'deeplab_jax.datasets.voc',
    'cityscapes': 'deeplab_jax.datasets.cityscapes',
    'ade20k': 'deeplab_jax.datasets.ade20k',
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A TFDS dataset as DeepLab reads it.

  `label_map` (256 entries, uint8) maps stored mask values to training labels (class ids, or 255 for
  ignore), e.g. Cityscapes labelIds -> trainIds; None keeps the stored values. Which splits to read
  is the config's (`config.data.train_split`, `eval_split`).
  """

  tfds_name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_key: str = 'image'
  label_key: str = 'segmentation_mask'
  label_map: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(f'{self.tfds_name}: {len(self.class_names)} class names for '
                       f'{self.num_classes} classes.')


_SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
  """Make `spec` known to `get_spec`; a different spec under a name already taken is an error."""
  known = _SPECS.get(spec.tfds_name)
  if known is not None and (known != spec or not _same_label_map(known, spec)):
    raise ValueError(f'A different dataset spec is already registered as {spec.tfds_name!r}; '
                     'pick another name.')
  _SPECS[spec.tfds_name] = spec
  return spec


def _same_label_map(a: DatasetSpec, b: DatasetSpec) -> bool:
  if a.label_map is None or b.label_map is None:
    return a.label_map is b.label_map
  return np.array_equal(a.label_map, b.label_map)


def base_name(name: str) -> str:
  """The dataset part of a TFDS name: 'cityscapes/semantic_segmentation:1.0.0' -> 'cityscapes'."""
  return name.split(':')[0].split('/')[0]


def get_spec(name: str, data_dir: str | None = None) -> DatasetSpec:
  """The spec of TFDS dataset `name` (the part before any ':version' or '/config'); see module doc.

  Raises ValueError naming the known datasets for a name that is none of them.
  """
  base = base_name(name)
  if base not in _SPECS and base in _MODULES:
    importlib.import_module(_MODULES[base])
  if base not in _SPECS:
    spec = stored_spec(name, data_dir)
    if spec is None:
      raise ValueError(f'config.data.dataset={name!r} is not a dataset deeplab_jax knows; known: '
                       f'{sorted(set(_SPECS) | set(_MODULES))}. For your own images and masks '
                       'see `deeplab_jax.datasets.custom`.')
    register(spec)
  return _SPECS[base]


def stored_spec(name: str, data_dir: str | None = None) -> DatasetSpec | None:
  """The spec of custom dataset `name` built in `data_dir`, from its stored metadata; None when
  there is no such custom dataset (see `deeplab_jax.datasets.custom`)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 - only custom names need TFDS here.

  try:
    info = tfds.builder(name, data_dir=data_dir).info
    metadata = dict(info.metadata or {})
  except Exception:  # Not built there, or not a dataset at all.
    return None
  if not metadata.get('deeplab_custom_segmentation'):
    return None
  return DatasetSpec(name, int(metadata['num_classes']), tuple(metadata['class_names']))
