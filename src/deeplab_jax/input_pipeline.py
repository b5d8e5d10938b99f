"""tf.data input pipeline for every dataset (TFDS builders registered in `deeplab_jax.datasets`).

Training follows the official DeepLab recipe: random scale in [min_scale, max_scale] (steps of
scale_step; bilinear for images, nearest for labels, both with aligned corners), padding to the crop
with the mean pixel (images) and 255 (labels), a random crop and a random left-right flip.

Determinism, topology and exact resume: the *global* batch of step s is a pure function of
(train.seed, s) alone: the same images with the same augmentation in the same rows, whatever the
number of processes and devices, so a run gives the same numbers on 1 process x 4 devices or 2 x 2
and resumes exactly on another slice size. The global batch has B rows ("lanes"). In epoch e the
split's N records, in stored order rotated by an offset drawn from (seed, e), are cut into B
contiguous lanes of L = N // B records (the N mod B left over change from epoch to epoch); lane r is
shuffled (seed, e, r) and its t-th record fills row r of step e * L + t. Each row's augmentation is
seeded by (seed, its global position s * B + r). A process owns the contiguous rows
[p * B/P, (p+1) * B/P) and reads only its lanes' records, so reading, decoding and augmenting per
process fall as processes are added. `start_step=k` starts at epoch k // L and skips the records of
the steps before k *before* they are decoded, so resuming costs a file read, not a decode of every
skipped image.

Labels: masks go through the dataset's `label_map` (if any); any value then outside [0, num_classes)
other than 255 stops the pipeline with an error naming the value and the image, because training on
such pixels silently would be wrong and a guessed mapping would hide a bad `label_map`.

Shuffling: each lane is shuffled in a window of `config.data.shuffle_buffer // B` records (a uniform
permutation of the lane when it is no longer than that); TFDS already stored the records in a hashed
random order, and the lanes change with the offset every epoch.

TensorFlow runs on the CPU only: the pipeline hides accelerators from it, leaving them to JAX.
`python -m deeplab_jax.tools.input_throughput --config=CONFIG` measures the training pipeline.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from deeplab_jax import sharding, sliding
from deeplab_jax.datasets import spec as spec_lib
from deeplab_jax.datasets.spec import IGNORE_LABEL
from deeplab_jax.errors import ConfigError, DatasetError

Batch = dict[str, np.ndarray]


def hide_accelerators_from_tf() -> None:
  """Keep TF on the CPU so it leaves GPU memory to JAX."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF devices already initialised; nothing more can be done.
    pass


# ------------------------------------------------------------------------------------------------
# Single-example transforms (graph functions on one decoded example).


def random_scale(seed: tf.Tensor, min_scale: float, max_scale: float, scale_step: float
                 ) -> tf.Tensor:
  """A scale from {min, min+step, ..., max} (uniform in [min, max] if step <= 0), statelessly."""
  if min_scale == max_scale:
    return tf.constant(min_scale, tf.float32)
  if scale_step <= 0:
    return tf.random.stateless_uniform([], seed, min_scale, max_scale)
  count = int(round((max_scale - min_scale) / scale_step)) + 1
  index = tf.random.stateless_uniform([], seed, 0, count, dtype=tf.int32)
  return min_scale + tf.cast(index, tf.float32) * scale_step


def _pad_bottom_right(image: tf.Tensor, label: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                      mean_pixel: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
  """Pad image (with the exact mean pixel) and label (with 255) at the bottom/right to (h, w)."""
  shape = tf.shape(label)
  paddings = [[0, height - shape[0]], [0, width - shape[1]]]
  outside = tf.pad(tf.zeros_like(label, tf.float32), paddings, constant_values=1.0)[..., None]
  image = tf.pad(image, paddings + [[0, 0]]) + outside * tf.constant(mean_pixel, tf.float32)
  label = tf.pad(label, paddings, constant_values=IGNORE_LABEL)
  return image, label


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *, crop_size: Sequence[int],
            mean_pixel: Sequence[float], min_scale: float, max_scale: float, scale_step: float,
            flip: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """Scale, pad, crop and flip one example: image [H, W, 3] -> float32 [ch, cw, 3] in [0, 255],
  label [H, W] -> int32 [ch, cw]. `seed` (shape [2]) fixes every random choice."""
  scale_seed, y_seed, x_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  crop_h, crop_w = crop_size
  image = tf.cast(image, tf.float32)
  label = tf.cast(label, tf.int32)

  scale = random_scale(scale_seed, min_scale, max_scale, scale_step)
  size = tf.maximum(tf.cast(tf.cast(tf.shape(label), tf.float32) * scale, tf.int32), 1)
  image = tf.raw_ops.ResizeBilinear(images=image[None], size=size, align_corners=True)[0]
  label = tf.raw_ops.ResizeNearestNeighbor(images=label[None, ..., None], size=size,
                                           align_corners=True)[0, ..., 0]

  height, width = tf.maximum(size[0], crop_h), tf.maximum(size[1], crop_w)
  image, label = _pad_bottom_right(image, label, height, width, mean_pixel)
  top = tf.random.stateless_uniform([], y_seed, 0, height - crop_h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], x_seed, 0, width - crop_w + 1, dtype=tf.int32)
  image = image[top:top + crop_h, left:left + crop_w]
  label = label[top:top + crop_h, left:left + crop_w]

  if flip:
    do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(do_flip, lambda: tf.reverse(image, [1]), lambda: image)
    label = tf.cond(do_flip, lambda: tf.reverse(label, [1]), lambda: label)
  image.set_shape([crop_h, crop_w, 3])
  label.set_shape([crop_h, crop_w])
  return image, label


def pad_for_eval(image: tf.Tensor, label: tf.Tensor, name: tf.Tensor, *,
                 crop_size: Sequence[int], mean_pixel: Sequence[float]
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """Pad a whole image (not resized) to the eval crop; an image bigger than it is an error."""
  crop_h, crop_w = crop_size
  shape = tf.shape(label)
  fits = tf.logical_and(shape[0] <= crop_h, shape[1] <= crop_w)
  check = tf.debugging.Assert(fits, [
      'Eval image', name, 'has height, width', shape, f'which exceeds config.eval.crop_size='
      f'{tuple(crop_size)}. Images are padded, never resized, for evaluation: raise '
      'config.eval.crop_size to at least the largest image size of the split (ideally '
      'output_stride * k + 1, e.g. 513 for VOC, (1025, 2049) for Cityscapes), or evaluate in '
      "windows of the crop with config.eval.mode='slide'."], summarize=4)
  with tf.control_dependencies([check]):  # identity: a no-op cast would not wait for the check.
    image, label = tf.cast(image, tf.float32), tf.identity(tf.cast(label, tf.int32))
  image, label = _pad_bottom_right(image, label, crop_h, crop_w, mean_pixel)
  image.set_shape([crop_h, crop_w, 3])
  label.set_shape([crop_h, crop_w])
  return image, label


def check_labels(label: tf.Tensor, num_classes: int, name: tf.Tensor) -> tf.Tensor:
  """`label` unchanged if every value is a class id or 255; otherwise an error naming the values."""
  label = tf.cast(label, tf.int32)
  bad = tf.logical_and(tf.logical_or(label < 0, label >= num_classes), label != IGNORE_LABEL)

  def fail():
    values = tf.unique(tf.boolean_mask(label, bad))[0]
    check = tf.debugging.Assert(False, [
        'Label values', values, 'in', name, f'are neither a class id (0 to {num_classes - 1}) '
        f'nor {IGNORE_LABEL} (ignore). Fix the DatasetSpec label_map (stored value -> class id or 255) '
        'or num_classes.'], summarize=20)
    with tf.control_dependencies([check]):
      return tf.identity(label)

  return tf.cond(tf.reduce_any(bad), fail, lambda: label)


# ------------------------------------------------------------------------------------------------
# Reading records.


def _open_dataset(config: ml_collections.ConfigDict, process_count: int
                  ) -> tuple[spec_lib.DatasetSpec, tfds.core.DatasetBuilder]:
  """The dataset's spec and TFDS builder, prepared on first use when this is a single-process job."""
  hide_accelerators_from_tf()
  spec = spec_lib.get_spec(config.data.dataset, config.data.data_dir)
  builder = tfds.builder(config.data.dataset, data_dir=config.data.data_dir)
  if not builder.is_prepared():
    if process_count > 1:
      raise DatasetError(f'{config.data.dataset} is not prepared under data_dir='
                         f'{config.data.data_dir!r}; prepare it once before a multi-process job '
                         '(e.g. `tfds build` or one single-process run).')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return spec, builder


def _serialized_records(builder: tfds.core.DatasetBuilder, split, spec: spec_lib.DatasetSpec
                        ) -> tf.data.Dataset:
  """The split's examples in stored order with image and label still encoded, plus a `name`."""
  decoders = {spec.image_key: tfds.decode.SkipDecoding(),
              spec.label_key: tfds.decode.SkipDecoding()}
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=read_config)
  has_file_name = 'file_name' in builder.info.features

  def select(example):
    name = example['file_name'] if has_file_name else example['tfds_id']
    return {'image': example[spec.image_key], 'label': example[spec.label_key], 'name': name}

  return ds.map(select)


def _decoder(builder: tfds.core.DatasetBuilder, spec: spec_lib.DatasetSpec
             ) -> Callable[[dict], tuple[tf.Tensor, tf.Tensor]]:
  """Decodes a serialized record into image [H, W, 3] and a checked, mapped label [H, W] int32."""
  features = builder.info.features
  image_feature, label_feature = features[spec.image_key], features[spec.label_key]
  label_map = None if spec.label_map is None else tf.constant(spec.label_map, tf.int32)

  def decode(record):
    image = image_feature.decode_example(record['image'])
    label = tf.cast(label_feature.decode_example(record['label']), tf.int32)
    if label.shape.rank == 3:
      label = label[..., 0]
    if label_map is not None:
      label = tf.gather(label_map, label)
    return image, check_labels(label, spec.num_classes, record['name'])

  return decode


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order (resume depends on it); one thread per op, parallelism across examples."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


class _NumpyBatches:
  """Batches as numpy; a failed data check surfaces as a DatasetError carrying its message."""

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = ds.as_numpy_iterator()

  def __iter__(self) -> _NumpyBatches:
    return self

  def __next__(self) -> Batch:
    try:
      return next(self._iterator)
    except tf.errors.InvalidArgumentError as e:
      raise DatasetError(_assertion_text(e.message)) from None


def _assertion_text(message: str) -> str:
  """The readable part of a failed tf.debugging.Assert: its data items joined by spaces."""
  start = message.find('assertion failed: [')
  if start < 0:
    return message
  body = message[start + len('assertion failed: ['):].split('\n', 1)[0]
  return ' '.join(body.rstrip().removesuffix(']').split('] ['))


# ------------------------------------------------------------------------------------------------
# Public iterators.


def _split_pieces(builder: tfds.core.DatasetBuilder, split: str) -> list[tuple[str, int, int]]:
  """The (split name, from, to) record ranges a split spec ('train', 'train[:80%]+validation')
  reads, in order."""
  splits = builder.info.splits
  instruction = tfds.core.ReadInstruction.from_spec(split)
  return [(a.splitname, a.from_ or 0, splits[a.splitname].num_examples if a.to is None else a.to)
          for a in instruction.to_absolute(splits)]


def _record_range(builder: tfds.core.DatasetBuilder, spec: spec_lib.DatasetSpec,
                  pieces: Sequence[tuple[str, int, int]], start: int, stop: int) -> tf.data.Dataset:
  """Records [start, stop) of the split (`pieces` in order, indices modulo its size), encoded."""
  total = sum(b - a for _, a, b in pieces)
  ranges = [(start % total, min(stop - start, total - start % total))]
  if stop - start > ranges[0][1]:
    ranges.append((0, stop - start - ranges[0][1]))
  parts = []
  for first, count in ranges:
    offset = 0
    for name, a, b in pieces:
      lo, hi = max(first, offset), min(first + count, offset + b - a)
      if lo < hi:
        parts.append(_serialized_records(
            builder, f'{name}[{a + lo - offset}:{a + hi - offset}]', spec))
      offset += b - a
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds


def _seed(*values: int) -> int:
  """A 62-bit seed drawn from `values` (the same on every process and run)."""
  return int(np.random.default_rng([int(v) for v in values]).integers(1, 2**62))


_ROTATION, _LANE = 1, 2  # Separate seed streams for the epoch offset and the lane shuffles.


def create_train_iterator(config: ml_collections.ConfigDict, *, mean_pixel: Sequence[float],
                          process_index: int = 0, process_count: int = 1, start_step: int = 0
                          ) -> Iterator[Batch]:
  """This process's rows of the global training batches from step `start_step` on, forever.

  Yields {'image': float32 [b, H, W, 3] in [0, 255], 'label': int32 [b, H, W]} with
  b = train.batch_size // process_count and (H, W) = train.crop_size: rows
  [process_index * b, (process_index + 1) * b) of each global batch, which is a pure function of
  (train.seed, step) (see the module docstring).
  """
  spec, builder = _open_dataset(config, process_count)
  global_batch = int(config.train.batch_size)
  rows = sharding.local_batch_size(global_batch, 'config.train.batch_size', process_count)
  split = config.data.train_split
  pieces = _split_pieces(builder, split)
  size = sum(b - a for _, a, b in pieces)
  lane_length = size // global_batch
  if lane_length == 0:
    raise DatasetError(f'{config.data.dataset}: split {split!r} has {size} examples, fewer than '
                       f'config.train.batch_size={global_batch}; use a smaller batch.')
  seed = int(config.train.seed)
  buffer = max(1, min(lane_length, int(config.data.shuffle_buffer) // global_batch))
  decode = _decoder(builder, spec)
  base_seed = tf.constant([seed, 0], tf.int64)
  crop_size = tuple(config.train.crop_size)
  first_row = process_index * rows

  def process(record):
    image, label = decode(record)
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, record['position'])
    image, label = augment(
        image, label, example_seed, crop_size=crop_size, mean_pixel=mean_pixel,
        min_scale=float(config.data.min_scale), max_scale=float(config.data.max_scale),
        scale_step=float(config.data.scale_step), flip=bool(config.data.flip))
    return {'image': image, 'label': label}

  def epoch(index: int, skip_steps: int) -> tf.data.Dataset:
    offset = _seed(seed, _ROTATION, index) % size
    lanes = []
    for lane in range(first_row, first_row + rows):
      start = offset + lane * lane_length
      records = _record_range(builder, spec, pieces, start, start + lane_length)
      lanes.append(records.shuffle(buffer, seed=_seed(seed, _LANE, index, lane),
                                   reshuffle_each_iteration=False))
    steps = tf.data.Dataset.zip(tuple(lanes)).skip(skip_steps)
    steps = steps.enumerate(start=index * lane_length + skip_steps)

    def step_rows(step, records):
      positions = step * global_batch + first_row + tf.range(rows, dtype=tf.int64)
      stacked = {k: tf.stack([r[k] for r in records]) for k in ('image', 'label', 'name')}
      return tf.data.Dataset.from_tensor_slices({**stacked, 'position': positions})

    ds = steps.flat_map(step_rows)  # Still encoded: skipped steps were never decoded.
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(rows, drop_remainder=True)
    return _options(ds.prefetch(config.data.prefetch))

  def batches() -> Iterator[Batch]:
    index, skip_steps = divmod(int(start_step), lane_length)
    while True:
      yield from _NumpyBatches(epoch(index, skip_steps))
      index, skip_steps = index + 1, 0

  return batches()


def create_eval_iterator(config: ml_collections.ConfigDict, *, mean_pixel: Sequence[float],
                         process_index: int = 0, process_count: int = 1
                         ) -> tuple[Iterator[Batch], int]:
  """This process's evaluation batches (one pass) and the number of real images over all processes.

  Yields {'image': float32 [B, Hc, Wc, 3], 'label': int32 [B, Hc, Wc], 'valid': bool [B],
  'size': int32 [B, 2]} with B = eval.batch_size // process_count: whole images padded at the
  bottom/right with the mean pixel and label 255, and each image's own (height, width) in `size`.
  `config.eval.mode='whole'`: (Hc, Wc) = eval.crop_size, and an image larger than it is an error.
  `'slide'`: images may be larger than the window (eval.crop_size); (Hc, Wc) is the largest
  `sliding.padded_size` among the batch's images, so it can change from batch to batch. Every
  process yields the same number of batches; the rows past the end are padding (mean-pixel image,
  label all 255, valid False, size 0).
  """
  spec, builder = _open_dataset(config, process_count)
  batch_size = sharding.local_batch_size(config.eval.batch_size, 'config.eval.batch_size',
                                         process_count)
  split = config.data.eval_split
  total = builder.info.splits[split].num_examples
  if config.eval.num_images is not None and config.eval.num_images < total:
    if '[' in split:
      raise ConfigError(f'config.data.eval_split={split!r} is already a slice; leave '
                        'config.eval.num_images unset or use a plain split name.')
    total = int(config.eval.num_images)
    split = f'{split}[:{total}]'
  shards = tfds.even_splits(split, n=process_count) if process_count > 1 else [split]
  sizes = [builder.info.splits[s].num_examples for s in shards]
  num_batches = math.ceil(max(sizes) / batch_size)
  padding = num_batches * batch_size - sizes[process_index]
  decode = _decoder(builder, spec)
  ds = _serialized_records(builder, shards[process_index], spec)
  if config.eval.mode == 'slide':
    return _slide_batches(ds, decode, config, batch_size, padding, mean_pixel), total

  crop_size = tuple(config.eval.crop_size)

  def process(record):
    image, label = decode(record)
    size = tf.shape(label)[:2]
    image, label = pad_for_eval(image, label, record['name'], crop_size=crop_size,
                                mean_pixel=mean_pixel)
    return {'image': image, 'label': label, 'valid': tf.constant(True), 'size': size}

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  filler = {
      'image': tf.broadcast_to(tf.constant(mean_pixel, tf.float32), (*crop_size, 3)),
      'label': tf.fill(crop_size, tf.constant(IGNORE_LABEL, tf.int32)),
      'valid': tf.constant(False),
      'size': tf.zeros([2], tf.int32),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(padding))
  ds = _options(ds.batch(batch_size).prefetch(config.data.prefetch))
  return _NumpyBatches(ds), total


def images(config: ml_collections.ConfigDict, split: str, num_images: int) -> Iterator[np.ndarray]:
  """The first `num_images` images of `split` in stored order, decoded and neither resized nor
  padded: uint8 [H, W, 3] (what exported models are calibrated and checked on)."""
  spec, builder = _open_dataset(config, 1)
  decode = builder.info.features[spec.image_key].decode_example
  ds = _serialized_records(builder, split, spec).take(int(num_images))
  yield from ds.map(lambda record: decode(record['image'])).as_numpy_iterator()


def pad_batch(batch: Batch, size: Sequence[int], mean_pixel: Sequence[float]) -> Batch:
  """`batch` with its images padded at the bottom/right to `size` (mean pixel, label 255)."""
  height, width = batch['label'].shape[1:3]
  out_h, out_w = int(size[0]), int(size[1])
  if (height, width) == (out_h, out_w):
    return batch
  rows = batch['label'].shape[0]
  image = np.empty((rows, out_h, out_w, 3), np.float32)
  image[...] = np.asarray(mean_pixel, np.float32)
  image[:, :height, :width] = batch['image']
  label = np.full((rows, out_h, out_w), IGNORE_LABEL, np.int32)
  label[:, :height, :width] = batch['label']
  return {**batch, 'image': image, 'label': label}


def _slide_batches(ds: tf.data.Dataset, decode: Callable, config: ml_collections.ConfigDict,
                   batch_size: int, padding: int, mean_pixel: Sequence[float]) -> Iterator[Batch]:
  """Slide-mode batches: decoded images of any size, stacked on the host after padding each batch
  to the largest `sliding.padded_size` of its images (see `create_eval_iterator`)."""
  window, stride = sliding.eval_window(config)

  def process(record):
    image, label = decode(record)
    return {'image': tf.cast(image, tf.float32), 'label': label}

  ds = _options(ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(config.data.prefetch))
  filler = {'image': np.broadcast_to(np.asarray(mean_pixel, np.float32), (*window, 3)),
            'label': np.full(window, IGNORE_LABEL, np.int32)}
  fillers = [None] * padding

  def batch_of(examples: list) -> Batch:
    size = sliding.padded_size(
        np.max([(filler if e is None else e)['label'].shape for e in examples], axis=0), window,
        stride)
    rows = [pad_batch({'image': (filler if e is None else e)['image'][None],
                       'label': (filler if e is None else e)['label'][None]}, size, mean_pixel)
            for e in examples]
    return {'image': np.concatenate([r['image'] for r in rows]),
            'label': np.concatenate([r['label'] for r in rows]),
            'valid': np.asarray([e is not None for e in examples]),
            'size': np.asarray([(0, 0) if e is None else e['label'].shape for e in examples],
                               np.int32).reshape(-1, 2)}

  def batches() -> Iterator[Batch]:
    pending = []
    for example in itertools.chain(_NumpyBatches(ds), fillers):
      pending.append(example)
      if len(pending) == batch_size:
        yield batch_of(pending)
        pending = []
    if pending:
      yield batch_of(pending)

  return batches()


if __name__ == '__main__':  # The older spelling of `python -m deeplab_jax.tools.input_throughput`.
  from deeplab_jax.tools.input_throughput import run

  run()
