"""The project's error types: one base class, one subclass per kind of bad input.

Every message names the thing that is wrong and the fix. The programs (`deeplab_jax.tools.app`)
print a `DeeplabError` as one line and exit with status 1; anything else is a bug and keeps its
traceback. Each subclass is also a `ValueError` (or `FloatingPointError`), so callers that catch
those keep working.
"""

from __future__ import annotations


class DeeplabError(Exception):
  """Base class: a problem with the user's config, data, checkpoint or weights."""


class ConfigError(DeeplabError, ValueError):
  """A config that cannot work; the message names the field and the fix."""


class CheckpointError(DeeplabError, ValueError):
  """No checkpoint where one is needed, or one that does not fit the model."""


class ConversionError(DeeplabError, ValueError):
  """Weights that do not fit the model: names, shapes and the fix, all in the message."""


class DatasetError(DeeplabError, ValueError):
  """A bad dataset file or record; the message names the file and the problem."""


class NonFiniteLossError(DeeplabError, FloatingPointError):
  """The training loss or gradient became NaN or infinite."""
