"""Input pipeline: image/label alignment through augmentation, determinism, exact resume, sharding,
evaluation padding and the label / crop-size checks."""

import hashlib

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from deeplab_jax import config as config_lib
from deeplab_jax import inference, input_pipeline, sliding
from deeplab_jax.datasets import shapes, spec
from deeplab_jax.tools import input_throughput

MEAN = (123.15, 115.90, 103.06)  # Not representable in float32: padding must still be exact.
PATTERN = np.array([0, 1, 2, 3, 2, 2, 1])  # Neighbours differ by <= 1, no mirror symmetry.
STEP = 60.0  # Image value per pattern unit.


def _coded_example(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Label 4*ty + tx; the image stores tx and ty in its first two channels (times STEP)."""
  tx = PATTERN[np.arange(width) % len(PATTERN)][None, :].repeat(height, 0)
  ty = PATTERN[np.arange(height) % len(PATTERN)][:, None].repeat(width, 1)
  image = np.stack([tx * STEP, ty * STEP, np.full_like(tx, 7.0)], -1).astype(np.uint8)
  return image, (4 * ty + tx).astype(np.uint8)


class LabelCodedToy(tfds.core.GeneratorBasedBuilder):
  """Images whose pixels encode their labels, of several sizes (16 classes)."""

  VERSION = tfds.core.Version('1.0.0')
  pkg_dir_path = epath.Path(__file__).parent  # TFDS would look for a package around the module.
  SIZES = ((20, 28), (37, 25), (30, 30), (41, 33), (26, 40), (33, 21))

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'mask': tfds.features.Image(shape=(None, None, 1)),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(), 'validation': self._generate_examples()}

  def _generate_examples(self):
    for i, (h, w) in enumerate(self.SIZES):
      image, label = _coded_example(h, w)
      yield i, {'image': image, 'mask': label[..., None]}


spec.register(spec.DatasetSpec(tfds_name='label_coded_toy', num_classes=16,
                               class_names=tuple(str(i) for i in range(16)), label_key='mask'))


def _check_alignment(image: np.ndarray, label: np.ndarray, exact: bool) -> None:
  """Every real pixel's label agrees with the value coded in the image; padding is mean / 255."""
  padded = label == 255
  np.testing.assert_array_equal(image[padded], np.broadcast_to(np.float32(MEAN), image.shape)[padded])
  tx, ty = image[..., 0][~padded] / STEP, image[..., 1][~padded] / STEP
  real = label[~padded]
  tolerance = 1e-6 if exact else 0.5 + 1e-3  # Bilinear vs nearest: at most half a step apart.
  assert np.max(np.abs(tx - real % 4)) <= tolerance
  assert np.max(np.abs(ty - real // 4)) <= tolerance


@pytest.mark.parametrize('scales', [(1.0, 1.0, 0.25), (0.5, 2.0, 0.25), (0.6, 1.7, 0.0)])
def test_augment_keeps_image_and_label_aligned(scales):
  image, label = _coded_example(29, 35)
  min_scale, max_scale, step = scales
  fn = tf.function(lambda seed: input_pipeline.augment(
    image, label, seed, crop_size=(24, 40), mean_pixel=MEAN, min_scale=min_scale,
    max_scale=max_scale, scale_step=step, flip=True))
  outcomes, flips = set(), 0
  for i in range(40):
    out_image, out_label = (t.numpy() for t in fn(tf.constant([3, i], tf.int64)))
    assert out_image.shape == (24, 40, 3) and out_image.dtype == np.float32
    assert out_label.shape == (24, 40) and out_label.dtype == np.int32
    assert np.any(out_label != 255)
    _check_alignment(out_image, out_label, exact=min_scale == max_scale)
    outcomes.add(out_label.tobytes())
    if min_scale == max_scale:
      flips += _runs_backwards(out_label[0][out_label[0] != 255] % 4)
  assert len(outcomes) > 10  # Crops / scales vary with the seed.
  if min_scale == max_scale:
    assert 5 < flips < 35  # About half of the examples are flipped.


def _runs_backwards(tx: np.ndarray) -> bool:
  """Whether a row of the coded x-pattern runs right to left (the crop was flipped)."""
  phases = [PATTERN[(np.arange(tx.size) + start) % len(PATTERN)] for start in range(7)]
  if any(np.array_equal(tx, p) for p in phases):
    return False
  assert any(np.array_equal(tx[::-1], p) for p in phases)
  return True


def test_random_scale_takes_the_official_steps():
  fn = tf.function(lambda seed: input_pipeline.random_scale(seed, 0.5, 2.0, 0.25))
  values = {round(float(fn(tf.constant([0, i], tf.int64))), 4) for i in range(200)}
  assert values == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}


def _config(data_dir, dataset='deeplab_shapes/tiny') -> ml_collections.ConfigDict:
  config = config_lib.get_base_config()
  config.data.dataset = dataset
  config.data.data_dir = str(data_dir)
  config.data.train_split = 'train'
  config.train.batch_size = 4
  config.train.crop_size = (33, 33)
  config.eval.batch_size = 3
  config.eval.crop_size = (64, 64)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  shapes.ensure_prepared(path, config='tiny')
  return path


def _take(config, n, **kwargs):
  iterator = input_pipeline.create_train_iterator(config, mean_pixel=MEAN, **kwargs)
  return [next(iterator) for _ in range(n)]


def test_train_pipeline_alignment_end_to_end(tmp_path):
  config = _config(tmp_path, 'label_coded_toy')
  config.train.batch_size = 6
  config.train.crop_size = (32, 32)
  for batch in _take(config, 3):
    assert batch['image'].shape == (6, 32, 32, 3) and batch['label'].shape == (6, 32, 32)
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    for image, label in zip(batch['image'], batch['label'], strict=True):
      _check_alignment(image, label, exact=False)


def test_same_seed_same_batches_and_exact_resume(data_dir):
  config = _config(data_dir)  # 24 training images, 4 per batch: 6 steps per epoch.
  run = _take(config, 10)
  again = _take(config, 10)
  for a, b in zip(run, again, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for start in (4, 6, 7):  # Mid-epoch, on and after the epoch boundary.
    for a, b in zip(run[start:], _take(config, 10 - start, start_step=start), strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  config.train.seed = 1
  other = _take(config, 2)
  assert not np.array_equal(other[0]['image'], run[0]['image'])


def _identity_config(data_dir):
  """No augmentation and a crop as big as any image: each row is its padded source image."""
  config = _config(data_dir)
  config.data.min_scale = config.data.max_scale = 1.0
  config.data.flip = False
  config.train.crop_size = (64, 64)
  return config


def _fingerprints(batches):
  return [hashlib.sha1(image.tobytes()).hexdigest() for b in batches for image in b['image']]


def test_each_epoch_is_a_fresh_permutation(data_dir):
  prints = _fingerprints(_take(_identity_config(data_dir), 12))
  first, second = prints[:24], prints[24:]
  assert len(set(first)) == 24 and set(first) == set(second)
  assert first != second


def test_the_global_batch_does_not_depend_on_the_process_count(data_dir):
  """Each process yields its rows of the one global batch: same images, same augmentation."""
  config = _config(data_dir)  # Augmentation on: the rows must match bit for bit.
  single = _take(config, 8)  # 24 images / batch 4: 6 steps an epoch, so 8 cross an epoch boundary.
  for processes in (2, 4):
    parts = [_take(config, 8, process_index=p, process_count=processes) for p in range(processes)]
    for step, whole in enumerate(single):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts]), whole[key], err_msg=(processes, step))
  # A resumed process produces its rows of the same steps.
  resumed = _take(config, 3, process_index=1, process_count=2, start_step=5)
  for i, batch in enumerate(resumed):
    np.testing.assert_array_equal(batch['image'], single[5 + i]['image'][2:])
  with pytest.raises(ValueError, match='positive multiple of 3'):
    _take(config, 1, process_index=0, process_count=3)


def test_processes_read_disjoint_shards(data_dir):
  config = _identity_config(data_dir)
  shards = [_fingerprints(_take(config, 6, process_index=p, process_count=2)) for p in (0, 1)]
  for prints in shards:
    assert len(prints) == 12 and len(set(prints)) == 12  # 2 per batch, 12 per epoch each.
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(_fingerprints(_take(config, 6)))


def test_a_split_smaller_than_the_batch_is_an_error(data_dir):
  config = _config(data_dir)
  config.train.batch_size = 32
  with pytest.raises(ValueError, match='24 examples, fewer than config.train.batch_size=32'):
    _take(config, 1)


def test_eval_iterator_pads_images_and_batches(data_dir):
  config = _config(data_dir)
  builder = tfds.builder('deeplab_shapes/tiny', data_dir=data_dir)
  stored = list(tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)))
  iterator, count = input_pipeline.create_eval_iterator(config, mean_pixel=MEAN)
  batches = list(iterator)
  assert count == 8 and len(batches) == 3
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 8 + [False])
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert images.shape == (9, 64, 64, 3) and labels.shape == (9, 64, 64) and labels.dtype == np.int32
  for image, label, ex in zip(images, labels, stored, strict=False):
    h, w = ex['image'].shape[:2]
    expected_image = inference.pad_image(ex['image'].astype(np.float32), (64, 64), MEAN)
    expected_label = inference.pad_image(ex['segmentation_mask'][..., 0], (64, 64), 255)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert np.all(label[h:] == 255) and np.all(image[:, w:] == np.float32(MEAN))
  assert np.all(labels[8] == 255) and np.all(images[8] == np.float32(MEAN))
  sizes = np.concatenate([b['size'] for b in batches])
  np.testing.assert_array_equal(sizes[:8], [ex['image'].shape[:2] for ex in stored])
  np.testing.assert_array_equal(sizes[8], [0, 0])


def test_slide_eval_iterator_keeps_large_images_whole(data_dir):
  config = _config(data_dir)
  config.eval.mode = 'slide'
  config.eval.crop_size = (33, 33)  # The window: every image (48-64 px) is larger.
  builder = tfds.builder('deeplab_shapes/tiny', data_dir=data_dir)
  stored = list(tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)))
  iterator, count = input_pipeline.create_eval_iterator(config, mean_pixel=MEAN)
  batches = list(iterator)
  assert count == 8 and len(batches) == 3
  rows = [(b, i) for b in batches for i in range(3)]
  for (batch, i), ex in zip(rows, stored, strict=False):
    h, w = ex['image'].shape[:2]
    frame = sliding.padded_size(np.max(batch['size'][batch['valid']], 0), (33, 33), (22, 22))
    assert batch['image'].shape == (3, *frame, 3) and batch['label'].shape == (3, *frame)
    assert batch['size'][i].tolist() == [h, w] and batch['valid'][i]
    np.testing.assert_array_equal(
        batch['image'][i], inference.pad_image(ex['image'].astype(np.float32), frame, MEAN))
    np.testing.assert_array_equal(
        batch['label'][i], inference.pad_image(ex['segmentation_mask'][..., 0], frame, 255))
  last = batches[-1]
  assert last['valid'].tolist() == [True, True, False] and last['size'][2].tolist() == [0, 0]
  assert np.all(last['label'][2] == 255) and np.all(last['image'][2] == np.float32(MEAN))


def test_eval_num_images_and_processes(data_dir):
  config = _config(data_dir)
  config.eval.num_images = 5
  iterator, count = input_pipeline.create_eval_iterator(config, mean_pixel=MEAN)
  batches = list(iterator)
  assert count == 5 and [b['valid'].tolist() for b in batches] == [[True] * 3, [True, True, False]]

  config.eval.num_images = None
  config.eval.batch_size = 4
  per_process = []
  for p in (0, 1):
    iterator, count = input_pipeline.create_eval_iterator(config, mean_pixel=MEAN,
                                                          process_index=p, process_count=2)
    batches = list(iterator)
    assert count == 8 and len(batches) == 2 and all(b['image'].shape[0] == 2 for b in batches)
    per_process.append({hashlib.sha1(x.tobytes()).hexdigest()
                        for b in batches for x, v in zip(b['image'], b['valid'], strict=True) if v})
  assert len(per_process[0]) == len(per_process[1]) == 4 and not per_process[0] & per_process[1]


def test_eval_image_bigger_than_crop_is_a_clear_error(data_dir):
  config = _config(data_dir)
  config.eval.crop_size = (40, 40)
  iterator, _ = input_pipeline.create_eval_iterator(config, mean_pixel=MEAN)
  with pytest.raises(ValueError, match=r'(?s)validation_\d+\.png.*raise\s+config\.eval\.crop_size'):
    list(iterator)


def test_out_of_range_labels_stop_the_pipeline(data_dir, monkeypatch):
  label_map = np.arange(256, dtype=np.uint8)
  label_map[3] = 9  # A wrong mapping: class 3 becomes 9, outside [0, 6).
  monkeypatch.setitem(spec._SPECS, 'deeplab_shapes', spec.DatasetSpec(
    tfds_name='deeplab_shapes', num_classes=6, class_names=shapes.CLASS_NAMES,
    label_map=label_map))
  with pytest.raises(ValueError, match=r'Label values 9 in train_\d+\.png .*label_map'):
    _take(_config(data_dir), 6)


def test_throughput_measurement(data_dir):
  result = input_throughput.measure_throughput(_config(data_dir), 2)
  assert result['images_per_s'] > 0 and result['batches'] == 2
