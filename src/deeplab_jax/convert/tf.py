"""Official TF1 (and TF2 name-based) checkpoints into deeplab_jax variables, by variable name.

TensorFlow is imported when a checkpoint is read, not with this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from deeplab_jax.convert.core import Report, Source, convert
from deeplab_jax.errors import ConversionError


def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix of `path`: a prefix (`DIR/model.ckpt`), or a directory holding one."""
  import tensorflow as tf  # noqa: PLC0415 - heavy; only reading a TF checkpoint needs it.

  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
    indexes = sorted(tf.io.gfile.glob(os.path.join(path, '*.index')))
    if len(indexes) == 1:
      return indexes[0][:-len('.index')]
    raise ConversionError(f'{path} is a directory with {len(indexes)} checkpoints (*.index); pass '
                          '--checkpoint=DIR/PREFIX, e.g. DIR/model.ckpt.')
  if not tf.io.gfile.exists(path + '.index'):
    raise ConversionError(f'No TF checkpoint at {path} ({path}.index does not exist); pass the '
                          'prefix, e.g. --checkpoint=deeplabv3_pascal_train_aug/model.ckpt.')
  return path


def tf_source(path: str) -> Source:
  """A TF1 (or TF2 name-based) checkpoint read by variable name with `tf.train.load_checkpoint`."""
  import tensorflow as tf  # noqa: PLC0415 - heavy; only reading a TF checkpoint needs it.

  prefix = resolve_tf_checkpoint(path)
  reader = tf.train.load_checkpoint(prefix)
  shapes = {name: tuple(int(d) for d in shape)
            for name, shape in reader.get_variable_to_shape_map().items()}

  def load(name: str) -> np.ndarray:
    return np.asarray(reader.get_tensor(name), np.float32)

  return Source(description=prefix, shapes=shapes, load=load)


def convert_tf(checkpoint_path: str, model_config: ml_collections.ConfigDict,
               skip: Sequence[str] = (), seed: int = 0, initialise: bool = True,
               logits_classes: slice | None = None) -> tuple[dict[str, Any], Report]:
  """Variables of the model of `model_config` from an official TF DeepLab or backbone checkpoint,
  optionally keeping only classes `logits_classes` of its logits."""
  source = tf_source(checkpoint_path)
  if logits_classes is not None:
    source = select_logits_classes(source, logits_classes)
  variables, report = convert(source, model_config, skip, seed, initialise)
  if logits_classes is not None:
    report.notes.append(f'Kept logits classes {logits_classes.start}:{logits_classes.stop} of the '
                        'checkpoint.')
  return variables, report


LOGITS = ('logits/semantic/weights', 'logits/semantic/biases')


def parse_slice(spec: str) -> slice:
  """'1:151' -> slice(1, 151); 'START:STOP[:STEP]' with Python's meaning of empty parts."""
  parts = spec.split(':')
  if not 2 <= len(parts) <= 3:
    raise ConversionError(f'--logits_classes={spec!r}: expected START:STOP, e.g. 1:151.')
  try:
    return slice(*(int(p) if p.strip() else None for p in parts))
  except ValueError as e:
    raise ConversionError(f'--logits_classes={spec!r}: expected integers, e.g. 1:151.') from e


def select_logits_classes(source: Source, classes: slice) -> Source:
  """`source` with only the classes `classes` of the logits (their last axis).

  The official ADE20K checkpoint has 151 logits, class 0 being 'other objects' (ignored); ours
  predict the 150 real classes, so it converts with classes 1:151.
  """
  shapes = dict(source.shapes)
  for name in LOGITS:
    if name not in shapes:
      raise ConversionError(f'--logits_classes given, but {source.description} has no {name}.')
    count = len(range(shapes[name][-1])[classes])
    shapes[name] = (*shapes[name][:-1], count)

  def load(name: str) -> np.ndarray:
    value = source.load(name)
    return value[..., classes] if name in LOGITS else value

  return dataclasses.replace(source, shapes=shapes, load=load)
