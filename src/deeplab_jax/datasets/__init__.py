"""Segmentation datasets as TFDS builders; importing this package registers them with TFDS."""

from deeplab_jax.datasets.spec import IGNORE_LABEL, DatasetSpec, get_spec, register

__all__ = ['IGNORE_LABEL', 'DatasetSpec', 'get_spec', 'register']

# Each dataset module registers its TFDS builder and its DatasetSpec on import.
# (Dataset modules are added below as they land: shapes, voc, cityscapes, ade20k, custom.)
from deeplab_jax.datasets import ade20k, cityscapes, custom, shapes, voc  # noqa: F401
