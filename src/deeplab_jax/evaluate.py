"""Evaluation: mIoU over a whole split, single- or multi-scale, as the official `eval.py`.

Images come padded to `config.eval.crop_size` (mean pixel, label 255). Per scale the padded batch is
resized bilinearly (align_corners=True) to `int((size - 1) * scale + 1)`, run through the model at
`config.eval.output_stride` (the same parameters serve any output stride), and its logits are resized
back; softmax probabilities are averaged over scales and left-right flips and the argmax is the
prediction. One confusion matrix is accumulated on the devices over the whole split (ignored, padded
and invalid pixels masked) and turned into mIoU by `metrics.segmentation_metrics`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image

from deeplab_jax import checkpoint, datasets, input_pipeline, metrics, models, paths, sharding
from deeplab_jax.models import layers

IGNORE_LABEL = datasets.IGNORE_LABEL  # Set by the data; training and metrics follow it.
IGNORE_COLOUR = (224, 224, 192)  # PASCAL VOC's colour for the ignore band.

EvalIteratorFn = Callable[..., tuple[Iterator[Mapping[str, np.ndarray]], int]]


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
  """The official `scale_dimension`: `int((dim - 1) * scale + 1)`, so that corners stay aligned."""
  return tuple(int((int(d) - 1) * scale + 1) for d in size[:2])


def predict(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
            scales: Sequence[float] = (1.0,), flip: bool = False) -> tuple[jax.Array, jax.Array]:
  """(probabilities, logits) [B, H, W, C] of `images` [B, H, W, 3] in 0..255, at input size.

  Probabilities are the softmax averaged over scales and flips (what the prediction is the argmax
  of, as in the official multi-scale inference); logits are averaged likewise (single scale without
  flip: exactly the model's logits). Pure: jit it once per input shape.
  """
  size = images.shape[1:3]
  probs, logits_sum, count = 0.0, 0.0, 0
  for scale in scales:
    x = images if scale == 1.0 else layers.resize_bilinear(images, scaled_size(size, scale))
    for flipped in ((False, True) if flip else (False,)):
      xi = x[:, :, ::-1] if flipped else x
      logits = model.apply(variables, xi, train=False).astype(jnp.float32)
      if flipped:
        logits = logits[:, :, ::-1]
      logits = layers.resize_bilinear(logits, size)
      probs = probs + jax.nn.softmax(logits, axis=-1)
      logits_sum = logits_sum + logits
      count += 1
  return probs / count, logits_sum / count


def voc_palette(num_colours: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (uint8 [num_colours, 3]); index 255 is VOC's ignore colour."""
  palette = np.zeros((num_colours, 3), np.uint8)
  for index in range(num_colours):
    c, r, g, b = index, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[index] = (r, g, b)
  if num_colours > IGNORE_LABEL:
    palette[IGNORE_LABEL] = IGNORE_COLOUR
  return palette


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """uint8 RGB image of an integer label map, VOC palette by default."""
  palette = voc_palette() if palette is None else palette
  return palette[np.clip(np.asarray(labels), 0, len(palette) - 1).astype(np.int64)]


def _safe_name(split: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_') or 'eval'


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


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], confusion: jax.Array,
              *, model: nn.Module, num_classes: int, scales: tuple[float, ...],
              flip: bool) -> tuple[jax.Array, jax.Array]:
  """Add a batch's (label, prediction) counts to `confusion`; also return the predictions."""
  probs, _ = predict(model, variables, batch['image'], scales, flip)
  prediction = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  mask = batch['valid'][:, None, None] & (batch['label'] != IGNORE_LABEL)
  return confusion + metrics.confusion_matrix(batch['label'], prediction, num_classes,
                                              mask), prediction


_EVAL_STEPS: dict[tuple[str, jax.sharding.Mesh], Callable] = {}
_MAX_EVAL_STEPS = 4


def _eval_step_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
  """`eval_step` of `config` jitted on `mesh`, once per process (reruns reuse the compilation)."""
  key = (json.dumps({'model': config.model.to_dict(), 'eval': config.eval.to_dict()},
                    sort_keys=True, default=str), mesh)
  if key not in _EVAL_STEPS:
    output_stride = config.eval.get('output_stride') or config.model.output_stride
    step = functools.partial(
        eval_step, model=models.build_model(config.model, output_stride),
        num_classes=config.model.num_classes, scales=tuple(float(s) for s in config.eval.scales),
        flip=bool(config.eval.flip))
    if len(_EVAL_STEPS) >= _MAX_EVAL_STEPS:
      _EVAL_STEPS.pop(next(iter(_EVAL_STEPS)))
    _EVAL_STEPS[key] = jax.jit(step, donate_argnums=(2,), out_shardings=(
        sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  return _EVAL_STEPS[key]


class Evaluator:
  """Evaluates model variables on `config.data.eval_split`; compiled once, reused across steps."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               class_names: Sequence[str], create_eval_iterator: EvalIteratorFn | None = None):
    self.config = config
    self.mesh = mesh
    self.class_names = tuple(class_names)
    self.num_classes = config.model.num_classes
    self.output_stride = config.eval.get('output_stride') or config.model.output_stride
    sharding.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
    self._create_eval_iterator = create_eval_iterator or input_pipeline.create_eval_iterator
    self._step = _eval_step_program(config, mesh)

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Local batches of exactly the local batch size (the iterator applies `eval.num_images`)."""
    local = sharding.local_batch_size(self.config.eval.batch_size)
    mean_pixel = models.mean_pixel(self.config.model.backbone)
    iterator, _ = self._create_eval_iterator(
        self.config, mean_pixel=mean_pixel, process_index=jax.process_index(),
        process_count=jax.process_count())
    for batch in iterator:
      batch = {k: np.asarray(batch[k]) for k in ('image', 'label', 'valid')}
      rows = batch['image'].shape[0]
      if rows > local:
        raise ValueError(f'The eval iterator yields {rows} rows per process; expected at most '
                         f'{local} (config.eval.batch_size / process count).')
      if rows < local:
        batch = _pad_rows(batch, local, mean_pixel)
      yield batch

  def __call__(self, variables: Mapping[str, Any], step: int,
               writer: metric_writers.MetricWriter | None = None,
               workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """mIoU etc. of `variables` (replicated on the mesh or host arrays) at `step`.

    Writes scalars and image summaries to `writer` and `WORKDIR/eval/<split>_<step>.json`.
    """
    e = self.config.eval
    variables = sharding.replicate({'params': variables['params'],
                                    'batch_stats': variables['batch_stats']}, self.mesh)
    pixels = int(np.prod(e.crop_size[:2])) * e.batch_size
    flush_every = max(1, (2**31 - 1) // max(pixels, 1))  # int32 cells cannot overflow
    total = np.zeros((self.num_classes, self.num_classes), np.int64)
    confusion = jax.device_put(np.zeros_like(total, np.int32), sharding.replicated(self.mesh))
    summary = None
    num_batches = 0
    with jax.set_mesh(self.mesh):
      for batch in self._batches():
        global_batch = sharding.global_batch(batch, self.mesh)
        confusion, prediction = self._step(variables, global_batch, confusion)
        if summary is None and e.get('num_summary_images', 0) > 0:
          summary = (batch, prediction)
        num_batches += 1
        if num_batches % flush_every == 0:
          total += np.asarray(confusion, np.int64)
          confusion = jax.device_put(np.zeros_like(total, np.int32),
                                     sharding.replicated(self.mesh))
      total += np.asarray(confusion, np.int64)
    if num_batches == 0:
      raise ValueError(f'The eval split {self.config.data.eval_split!r} gave no batches.')
    result = metrics.results_dict(step, metrics.segmentation_metrics(total), self.class_names,
                                  split=self.config.data.eval_split,
                                  output_stride=self.output_stride,
                                  scales=[float(s) for s in e.scales], flip=bool(e.flip))
    result['num_pixels'] = int(total.sum())
    logging.info('Eval at step %d on %s: mIoU %.4f, pixel accuracy %.4f', step,
                 self.config.data.eval_split, result['miou'], result['pixel_accuracy'])
    images = (self._summary_images(*summary)
              if summary is not None and jax.process_index() == 0 else None)
    if writer is not None:
      scalars = {'eval/miou': result['miou'], 'eval/pixel_accuracy': result['pixel_accuracy']}
      scalars.update({f'eval/iou/{name}': v for name, v in result['per_class_iou'].items()
                      if v is not None})
      writer.write_scalars(step, scalars)
      if images is not None:
        writer.write_images(step, images)
      writer.flush()
    if workdir is not None and jax.process_index() == 0:
      write_results(workdir, self.config.data.eval_split, step, result)
      if images is not None:
        write_images(workdir, self.config.data.eval_split, step, images)
    return result

  def _summary_images(self, batch: Mapping[str, np.ndarray],
                      prediction: jax.Array) -> dict[str, np.ndarray]:
    n = min(int(self.config.eval.num_summary_images), int(batch['valid'].sum()))
    rows = np.flatnonzero(batch['valid'])[:n]
    prediction = _local_rows(prediction)[rows]
    label = batch['label'][rows]
    return {
        'eval/input': np.clip(batch['image'][rows], 0, 255).astype(np.uint8),
        'eval/ground_truth': colorize(label),
        'eval/prediction': colorize(np.where(label == IGNORE_LABEL, IGNORE_LABEL, prediction)),
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
  return {'image': image.astype(np.float32), 'label': label, 'valid': valid}


def write_results(workdir: str | os.PathLike, split: str, step: int,
                  result: Mapping[str, Any]) -> str:
  """Write `WORKDIR/eval/<split>_<step>.json`; returns its path."""
  directory = paths.join(workdir, 'eval')
  paths.makedirs(directory)
  path = paths.join(directory, f'{_safe_name(split)}_{int(step)}.json')
  with paths.open(path, 'w') as f:
    json.dump(result, f, indent=2)
  return path


def write_images(workdir: str | os.PathLike, split: str, step: int,
                 images: Mapping[str, np.ndarray]) -> str:
  """Write each summary image as `WORKDIR/eval/<split>_<step>/<i>_<kind>.png` (kind: input,
  ground_truth, prediction); returns the directory."""
  directory = paths.join(workdir, 'eval', f'{_safe_name(split)}_{int(step)}')
  paths.makedirs(directory)
  for name, batch in images.items():
    kind = name.split('/')[-1]
    for i, image in enumerate(batch):
      with paths.open(paths.join(directory, f'{i}_{kind}.png'), 'wb') as f:
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format='PNG')
  return directory


def dataset_class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names of `config.data.dataset`, checking `config.model.num_classes` against it."""
  spec = datasets.get_spec(config.data.dataset, config.data.get('data_dir'))
  if spec.num_classes != config.model.num_classes:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} but dataset '
                     f'{config.data.dataset!r} has {spec.num_classes} classes; set '
                     f'config.model.num_classes={spec.num_classes}.')
  return tuple(spec.class_names)


def variables_template(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes (`jax.ShapeDtypeStruct`) of the model's params and batch_stats; nothing is computed."""
  model = models.build_model(config.model)
  size = tuple(config.eval.crop_size[:2])
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  return dict(jax.eval_shape(init, {'params': jax.random.key(0)}, x))


def load_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   step: int | None = None) -> tuple[dict[str, Any], int]:
  """Params + batch_stats of checkpoint `step` (None: `config.eval.checkpoint_step` or latest),
  checked against the model of `config`."""
  step = step if step is not None else config.eval.get('checkpoint_step')
  return checkpoint.restore_variables(workdir, step, template=variables_template(config))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                        create_eval_iterator: EvalIteratorFn | None = None) -> dict[str, Any]:
  """`--mode=eval`: evaluate the latest (or `config.eval.checkpoint_step`) checkpoint of `workdir`.

  Only params and batch_stats are read. Results go to TensorBoard, `metrics.jsonl` and
  `WORKDIR/eval/<split>_<step>.json`.
  """
  class_names = dataset_class_names(config)
  variables, step = load_variables(config, workdir)
  mesh = sharding.create_mesh()
  evaluator = Evaluator(config, mesh, class_names, create_eval_iterator)
  writer = metrics.create_writer(workdir)
  try:
    return evaluator(variables, step, writer, workdir)
  finally:
    writer.close()
