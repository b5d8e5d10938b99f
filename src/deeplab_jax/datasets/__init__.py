"""Segmentation datasets as TFDS builders, found by name through `get_spec`.

Importing this package is light: each dataset's module (and its TFDS builder) is imported the
first time `get_spec` is asked for it, or when you import it yourself.
"""

from deeplab_jax.datasets.spec import IGNORE_LABEL, DatasetSpec, get_spec, register
from deeplab_jax.errors import DatasetError

__all__ = ['IGNORE_LABEL', 'DatasetError', 'DatasetSpec', 'get_spec', 'register']
