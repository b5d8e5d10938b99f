"""Segmentation metrics from a confusion matrix, and where metrics are written.

mIoU follows the official evaluation (`tf.metrics.mean_iou`): one confusion matrix accumulated over
the whole split (rows: ground truth, columns: prediction; ignored pixels left out), per-class
`IoU = TP / (TP + FP + FN)`, and the mean over the classes whose denominator is non-zero, i.e. that
appear in the ground truth or the predictions. A class absent from both has no IoU (NaN / JSON null)
and does not count; a class predicted but absent from the ground truth counts with IoU 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

from deeplab_jax import paths

METRICS_FILE = 'metrics.jsonl'


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """int32 [num_classes, num_classes] counts of (label, prediction) pairs where `mask` is True.

  Labels outside [0, num_classes) (e.g. 255 = ignore) are left out.
  """
  labels = labels.astype(jnp.int32).reshape(-1)
  predictions = predictions.astype(jnp.int32).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid = valid & mask.reshape(-1)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
  """mIoU, per-class IoU (NaN where undefined) and pixel accuracy of a confusion matrix."""
  cm = np.asarray(confusion, np.float64)
  tp = np.diag(cm)
  denominator = cm.sum(0) + cm.sum(1) - tp
  present = denominator > 0
  iou = np.full(cm.shape[0], np.nan)
  iou[present] = tp[present] / denominator[present]
  total = cm.sum()
  return {
      'miou': float(np.mean(iou[present])) if present.any() else 0.0,
      'per_class_iou': iou,
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else 0.0,
  }


def results_dict(step: int, metrics: Mapping[str, Any], class_names: Sequence[str],
                 **extra: Any) -> dict[str, Any]:
  """The JSON record of an evaluation: per-class IoU keyed by class name, NaN -> None."""
  per_class = {name: (None if math.isnan(v) else float(v))
               for name, v in zip(class_names, metrics['per_class_iou'], strict=True)}
  return {'step': int(step), 'miou': float(metrics['miou']), 'per_class_iou': per_class,
          'pixel_accuracy': float(metrics['pixel_accuracy']), **extra}


class JsonlWriter(metric_writers.MetricWriter):
  """Appends every `write_scalars` call to a JSON-lines file as `{"step": s, name: value, ...}`.

  Only scalars are recorded: the file is for scripts and tests; TensorBoard has the rest. A local
  file is kept open for appending and flushed after every record. A URL (`gs://...`) cannot be
  appended to in place (a GCS object is written whole), so there every record re-reads the file and
  writes it back whole with the record added: each record is stored once `write_scalars` returns,
  and lines another writer (e.g. a separate eval job) added earlier are kept (two writes racing
  between one read and its write could still drop one of them).
  """

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)
    self._closed = False
    if paths.is_url(self._path):
      paths.makedirs(paths.dirname(self._path))
      self._file = None
    else:
      os.makedirs(os.path.dirname(self._path) or '.', exist_ok=True)
      self._file = open(self._path, 'a')  # noqa: SIM115 (closed in close())

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._file is None:
      self._rewrite_with(line)
    else:
      self._file.write(line)
      self._file.flush()

  def _rewrite_with(self, line: str) -> None:
    """Append `line` to the URL file by writing it whole (one upload: durable when it returns)."""
    if self._closed:
      raise ValueError(f'I/O operation on closed JsonlWriter ({self._path}).')
    path = paths.to_epath(self._path)
    text = path.read_text() if path.exists() else ''
    if text and not text.endswith('\n'):
      text += '\n'
    path.write_text(text + line)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    del step, values, metadata

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    del step, videos

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    del step, audios, sample_rate

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    del step, texts

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    self._closed = True
    if self._file is not None and not self._file.closed:
      self._file.close()


def create_writer(workdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """TensorBoard + logging (process 0; logging only elsewhere) plus `WORKDIR/metrics.jsonl`."""
  lead = jax.process_index() == 0
  default = metric_writers.create_default_writer(os.fspath(workdir), just_logging=not lead,
                                                 asynchronous=False)
  if not lead:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(paths.join(workdir, METRICS_FILE))])


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl` (a local path or a URL), in order of writing."""
  path = paths.join(workdir, METRICS_FILE)
  with paths.open_file(path) as f:
    return [json.loads(line) for line in f if line.strip()]
