"""Evaluation: mIoU over a whole split, single- or multi-scale, as the official `eval.py`.

`config.eval.mode='whole'`: images come padded to `config.eval.crop_size` (mean pixel, label 255)
and run through `inference.predict`; `'slide'`: images of any size come padded to
`sliding.padded_size` and run through `inference.predict_slide` in windows of the crop. Both at
`config.eval.output_stride` (the same parameters serve any output stride) with `config.eval.scales`
and `flip`. One confusion matrix is accumulated on the devices over the whole split (ignored, padded
and invalid pixels masked) and turned into mIoU by `metrics.segmentation_metrics`, and one per
width of `config.eval.trimap_widths` for the pixels near label boundaries (`trimap`). Results go to
`WORKDIR/eval/<split>_<step>.json`, TensorBoard and `metrics.jsonl`, with input / ground truth /
prediction PNGs of the first few images and charts (`plots`) as
`WORKDIR/eval/<split>_<step>_{per_class_iou,confusion,trimap}.png`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from deeplab_jax import (
    caching,
    inference,
    input_pipeline,
    metrics,
    models,
    paths,
    plots,
    sharding,
    sliding,
    trimap,
    validate,
    visualize,
)
from deeplab_jax.config import apply_smoke, eval_output_stride
from deeplab_jax.datasets.spec import IGNORE_LABEL

EvalIteratorFn = Callable[..., tuple[Iterator[Mapping[str, np.ndarray]], int]]


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array],
              counts: Mapping[str, jax.Array], *, model: nn.Module, num_classes: int,
              scales: tuple[float, ...], flip: bool,
              slide: tuple[tuple[int, int], tuple[int, int]] | None = None,
              trimap_widths: tuple[int, ...] = ()) -> tuple[dict[str, jax.Array], jax.Array]:
  """Add a batch's (label, prediction) counts to `counts` ('confusion' [C, C] and, with trimap
  widths, 'trimap' [K, C, C]); also return the predictions. `slide`: (window, stride)."""
  if slide is None:
    probs, _ = inference.predict(model, variables, batch['image'], scales, flip)
  else:
    probs, _ = inference.predict_slide(model, variables, batch['image'], *slide, scales=scales,
                                       flip=flip, sizes=batch['size'])
  prediction = inference.labels(probs)
  mask = batch['valid'][:, None, None] & (batch['label'] != IGNORE_LABEL)
  out = {'confusion': counts['confusion'] + metrics.confusion_matrix(
      batch['label'], prediction, num_classes, mask)}
  if trimap_widths:
    out['trimap'] = counts['trimap'] + trimap.trimap_confusion(
        batch['label'], prediction, batch['size'], batch['valid'], trimap_widths, num_classes)
  return out, prediction


@caching.keyed_cache(maxsize=4, key=lambda config, mesh: (
    caching.config_key(config.model, config.eval), mesh))
def _eval_step_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
  """`eval_step` of `config` jitted on `mesh`, once per process (reruns reuse the compilation);
  jit compiles it once per batch shape."""
  step = functools.partial(
      eval_step, model=models.build_model(config.model, eval_output_stride(config)),
      num_classes=config.model.num_classes, scales=tuple(float(s) for s in config.eval.scales),
      flip=bool(config.eval.flip),
      slide=sliding.eval_window(config) if config.eval.mode == 'slide' else None,
      trimap_widths=tuple(int(w) for w in config.eval.trimap_widths))
  return jax.jit(step, donate_argnums=(2,), out_shardings=(
      sharding.replicated(mesh), sharding.batch_sharding(mesh)))


class Evaluator:
  """Evaluates model variables on `config.data.eval_split`; compiled once, reused across steps."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               class_names: Sequence[str], create_eval_iterator: EvalIteratorFn | None = None):
    self.config = config
    self.mesh = mesh
    self.class_names = tuple(class_names)
    self.num_classes = config.model.num_classes
    self.output_stride = eval_output_stride(config)
    self.trimap_widths = tuple(int(w) for w in config.eval.trimap_widths)
    sharding.check_batch_size('config.eval.batch_size', config.eval.batch_size,
                              devices=mesh.devices.size)
    self._create_eval_iterator = create_eval_iterator or input_pipeline.create_eval_iterator
    self._step = _eval_step_program(config, mesh)

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Local batches of exactly the local batch size (the iterator applies `eval.num_images`),
    of one shape over all processes. Without a `size` from the iterator, each row's image is taken
    to fill the whole batch frame."""
    local = sharding.local_batch_size(self.config.eval.batch_size, 'config.eval.batch_size')
    mean_pixel = models.mean_pixel(self.config.model.backbone)
    iterator, _ = self._create_eval_iterator(
        self.config, mean_pixel=mean_pixel, process_index=jax.process_index(),
        process_count=jax.process_count())
    for batch in iterator:
      rows, height, width = np.shape(batch['label'])[:3]
      size = batch.get('size')
      batch = {k: np.asarray(batch[k]) for k in ('image', 'label', 'valid')}
      batch['size'] = (np.tile(np.int32([height, width]), (rows, 1)) if size is None
                       else np.asarray(size, np.int32).reshape(rows, 2))
      if rows > local:
        raise ValueError(f'The eval iterator yields {rows} rows per process; expected at most '
                         f'{local} (config.eval.batch_size / process count).')
      if rows < local:
        batch = _pad_rows(batch, local, mean_pixel)
      if jax.process_count() > 1 and self.config.eval.mode == 'slide':  # Sizes vary by batch.
        shapes = multihost_utils.process_allgather(np.int32([height, width]))
        batch = input_pipeline.pad_batch(batch, np.max(np.reshape(shapes, (-1, 2)), axis=0),
                                         mean_pixel)
      yield batch

  def __call__(self, variables: Mapping[str, Any], step: int,
               writer: metric_writers.MetricWriter | None = None,
               workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """mIoU etc. of `variables` (replicated on the mesh or host arrays) at `step`.

    Writes scalars and image summaries to `writer` and `WORKDIR/eval/<split>_<step>.json` (plus
    charts, see the module docstring).
    """
    e = self.config.eval
    variables = sharding.replicate({'params': variables['params'],
                                    'batch_stats': variables['batch_stats']}, self.mesh)
    c, k = self.num_classes, len(self.trimap_widths)
    shapes = {'confusion': (c, c), **({'trimap': (k, c, c)} if k else {})}
    totals = {name: np.zeros(shape, np.int64) for name, shape in shapes.items()}

    def zeros() -> dict[str, jax.Array]:
      return jax.device_put({name: np.zeros(shape, np.int32) for name, shape in shapes.items()},
                            sharding.replicated(self.mesh))

    def flush(counts: Mapping[str, jax.Array]) -> None:
      for name, value in jax.device_get(counts).items():
        totals[name] += np.asarray(value, np.int64)

    counts, counted = zeros(), 0  # `counted`: pixels in the int32 counts since the last flush.
    summary = None
    num_batches = 0
    with jax.set_mesh(self.mesh):
      for batch in self._batches():
        pixels = int(np.prod(batch['label'].shape)) * jax.process_count()
        if counted + pixels > 2**31 - 1:  # Flush before an int32 cell could overflow.
          flush(counts)
          counts, counted = zeros(), 0
        global_batch = sharding.global_batch(batch, self.mesh)
        counts, prediction = self._step(variables, global_batch, counts)
        counted += pixels
        if summary is None and e.num_summary_images > 0:
          summary = (batch, prediction)
        num_batches += 1
      flush(counts)
    if num_batches == 0:
      raise ValueError(f'The eval split {self.config.data.eval_split!r} gave no batches.')
    confusion = totals['confusion']
    settings = {'split': self.config.data.eval_split, 'output_stride': self.output_stride,
                'scales': [float(s) for s in e.scales], 'flip': bool(e.flip), 'mode': e.mode}
    if e.mode == 'slide':
      window, stride = sliding.eval_window(self.config)
      settings.update(window=list(window), stride=list(stride))
    result = metrics.results_dict(step, metrics.segmentation_metrics(confusion),
                                  self.class_names, **settings)
    result['num_pixels'] = int(confusion.sum())
    if k:
      result['trimap'] = [
          {'width': w, 'num_pixels': int(cm.sum()),
           **metrics.results_dict(step, metrics.segmentation_metrics(cm), self.class_names)}
          for w, cm in zip(self.trimap_widths, totals['trimap'], strict=True)]
      for band in result['trimap']:
        del band['step']
    result['confusion_matrix'] = confusion.tolist()
    logging.info('Eval at step %d on %s: mIoU %.4f, pixel accuracy %.4f%s', step,
                 self.config.data.eval_split, result['miou'], result['pixel_accuracy'],
                 ''.join(f', trimap {b["width"]}px {b["miou"]:.4f}'
                         for b in result.get('trimap', ())))
    lead = jax.process_index() == 0
    images = self._summary_images(*summary) if summary is not None and lead else None
    charts = self._charts(result, confusion) if lead and e.plots else None
    if writer is not None:
      scalars = {'eval/miou': result['miou'], 'eval/pixel_accuracy': result['pixel_accuracy']}
      scalars.update({f'eval/iou/{name}': v for name, v in result['per_class_iou'].items()
                      if v is not None})
      scalars.update({f'eval/trimap/miou_{b["width"]}px': b['miou']
                      for b in result.get('trimap', ())})
      writer.write_scalars(step, scalars)
      if images is not None:
        writer.write_images(step, images)
      if charts:
        writer.write_images(step, {f'eval/plots/{kind}': chart[None]
                                   for kind, chart in charts.items()})
      writer.flush()
    if workdir is not None and lead:
      write_results(workdir, self.config.data.eval_split, step, result)
      if images is not None:
        visualize.write_images(workdir, self.config.data.eval_split, step, images)
      if charts:
        write_charts(workdir, self.config.data.eval_split, step, charts)
    return result

  def _charts(self, result: Mapping[str, Any], confusion: np.ndarray) -> dict[str, np.ndarray]:
    """The eval's charts, or none (with a warning) where matplotlib is missing."""
    try:
      return plots.eval_charts(result, confusion, self.class_names)
    except ImportError as error:
      logging.warning('No eval charts (%s); pip install matplotlib, or set '
                      'config.eval.plots=False.', error)
      return {}

  def _summary_images(self, batch: Mapping[str, np.ndarray],
                      prediction: jax.Array) -> dict[str, np.ndarray]:
    n = min(int(self.config.eval.num_summary_images), int(batch['valid'].sum()))
    rows = np.flatnonzero(batch['valid'])[:n]
    prediction = _local_rows(prediction)[rows]
    label = batch['label'][rows]
    return {
        'eval/input': np.clip(batch['image'][rows], 0, 255).astype(np.uint8),
        'eval/ground_truth': visualize.colorize(label),
        'eval/prediction': visualize.colorize(
            np.where(label == IGNORE_LABEL, IGNORE_LABEL, prediction)),
    }


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int,
              mean_pixel: Sequence[float]) -> dict[str, np.ndarray]:
  n = batch['image'].shape[0]
  extra = rows - n
  image = np.concatenate([batch['image'], np.broadcast_to(
      np.asarray(mean_pixel, np.float32), (extra, *batch['image'].shape[1:]))])
  label = np.concatenate([batch['label'], np.full((extra, *batch['label'].shape[1:]),
                                                  IGNORE_LABEL, batch['label'].dtype)])
  valid = np.concatenate([batch['valid'], np.zeros(extra, bool)])
  size = np.concatenate([batch['size'], np.zeros((extra, 2), np.int32)])
  return {'image': image.astype(np.float32), 'label': label, 'valid': valid, 'size': size}


def write_results(workdir: str | os.PathLike, split: str, step: int,
                  result: Mapping[str, Any]) -> str:
  """Write `WORKDIR/eval/<split>_<step>.json`; returns its path."""
  directory = paths.join(workdir, 'eval')
  paths.makedirs(directory)
  path = paths.join(directory, f'{visualize.result_stem(split, step)}.json')
  with paths.open_file(path, 'w') as f:
    json.dump(result, f, indent=2)
  return path


def write_charts(workdir: str | os.PathLike, split: str, step: int,
                 charts: Mapping[str, np.ndarray]) -> list[str]:
  """Write each chart as `WORKDIR/eval/<split>_<step>_<kind>.png`; returns the paths."""
  directory = paths.join(workdir, 'eval')
  paths.makedirs(directory)
  stem = visualize.result_stem(split, step)
  return [visualize.write_png(paths.join(directory, f'{stem}_{kind}.png'), chart)
          for kind, chart in charts.items()]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                        create_eval_iterator: EvalIteratorFn | None = None) -> dict[str, Any]:
  """`--mode=eval`: evaluate the latest (or `config.eval.checkpoint_step`) checkpoint of `workdir`.

  Args:
    config: a full config; `config.smoke=True` shrinks it first. Only params and batch_stats are
      read, checked against `config.model` first.
    workdir: a workdir, checkpoints directory or step directory (local or URL).
    create_eval_iterator: the data (default `input_pipeline.create_eval_iterator`).

  Returns:
    The result dict also written to `WORKDIR/eval/<split>_<step>.json` (`step`, `miou`,
    `per_class_iou`, `pixel_accuracy`, settings, `num_pixels`, `trimap`, `confusion_matrix`);
    scalars also go to TensorBoard and metrics.jsonl.
  """
  config = apply_smoke(config)
  validate.validate_config(config, mode='eval')
  class_names = validate.dataset_spec(config).class_names
  variables, step = inference.load_variables(config, workdir)
  mesh = sharding.create_mesh()
  evaluator = Evaluator(config, mesh, class_names, create_eval_iterator)
  writer = metrics.create_writer(workdir)
  try:
    return evaluator(variables, step, writer, workdir)
  finally:
    writer.close()
