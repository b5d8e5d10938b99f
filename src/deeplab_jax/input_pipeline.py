"""tf.data input pipeline for every dataset (TFDS builders registered in `deeplab_jax.datasets`).

Training follows the official DeepLab recipe: random scale in [min_scale, max_scale] (steps of
scale_step; bilinear for images, nearest for labels, both with aligned corners), padding to the crop
with the mean pixel (images) and 255 (labels), a random crop and a random left-right flip.

Determinism and exact resume: the batches are a pure function of (train.seed, step, process_index).
Each epoch visits this process's shard in an order shuffled with a seed derived from (seed, epoch);
each example's augmentation uses stateless random ops seeded by (seed, process_index, its position in
the stream). `start_step=k` starts reading at epoch (k*B)//N and skips the remaining records *before*
they are decoded, so resuming costs a file read, not a decode of every skipped image.

Labels: masks go through the dataset's `label_map` (if any); any value then outside [0, num_classes)
other than 255 stops the pipeline with an error naming the value and the image, because training on
such pixels silently would be wrong and a guessed mapping would hide a bad `label_map`.

Shuffling uses a window of `config.data.shuffle_buffer` records (a uniform permutation of the epoch
when the shard is no larger than that); TFDS already stored the records in a hashed random order.

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


def create_train_dataset(config: ml_collections.ConfigDict, *, mean_pixel: Sequence[float],
                         process_index: int = 0, process_count: int = 1, start_step: int = 0
                         ) -> tf.data.Dataset:
  """The infinite tf.data pipeline behind `create_train_iterator` (same arguments)."""
  spec, builder = _open_dataset(config, process_count)
  batch_size = sharding.local_batch_size(config.train.batch_size, 'config.train.batch_size',
                                         process_count)
  split = config.data.train_split
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  epoch_size = builder.info.splits[split].num_examples
  if epoch_size == 0:
    raise DatasetError(f'{config.data.dataset}: split {split} is empty for process '
                       f'{process_index}.')

  records = _serialized_records(builder, split, spec)
  seed = int(config.train.seed)
  buffer = max(1, min(int(config.data.shuffle_buffer), epoch_size))

  def epoch(index):
    epoch_seed = tf.random.stateless_uniform(
        [], tf.stack([tf.constant(seed, tf.int64), index]), 1, 2**62, dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  first = int(start_step) * batch_size
  first_epoch, offset = divmod(first, epoch_size)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = ds.enumerate(start=first_epoch * epoch_size).skip(offset)  # Skipped while still encoded.

  decode = _decoder(builder, spec)
  base_seed = tf.constant([seed, process_index], tf.int64)
  crop_size = tuple(config.train.crop_size)

  def process(position, record):
    image, label = decode(record)
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    image, label = augment(
        image, label, example_seed, crop_size=crop_size, mean_pixel=mean_pixel,
        min_scale=float(config.data.min_scale), max_scale=float(config.data.max_scale),
        scale_step=float(config.data.scale_step), flip=bool(config.data.flip))
    return {'image': image, 'label': label}

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return _options(ds.prefetch(config.data.prefetch))


def create_train_iterator(config: ml_collections.ConfigDict, *, mean_pixel: Sequence[float],
                          process_index: int = 0, process_count: int = 1, start_step: int = 0
                          ) -> Iterator[Batch]:
  """This process's training batches from step `start_step` on, forever.

  Yields {'image': float32 [B, H, W, 3] in [0, 255], 'label': int32 [B, H, W]} with
  B = train.batch_size // process_count and (H, W) = train.crop_size; a pure function of
  (train.seed, step, process_index), so a resumed run sees exactly the batches it would have seen.
  """
  return _NumpyBatches(create_train_dataset(
      config, mean_pixel=mean_pixel, process_index=process_index, process_count=process_count,
      start_step=start_step))


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
