"""The embedded `deeplab_shapes` dataset: builds offline, sane labels with an ignore band, deterministic."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deeplab_jax import datasets
from deeplab_jax.datasets import shapes


def _examples(data_dir, split):
  builder = shapes.ensure_prepared(data_dir, config='tiny')
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return {ex['file_name'].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  shapes.ensure_prepared(path, config='tiny')
  return path


def test_spec_is_registered():
  spec = datasets.get_spec('deeplab_shapes/tiny')
  assert spec.num_classes == 6 and spec.class_names[0] == 'background'
  assert (spec.image_key, spec.label_key) == ('image', 'segmentation_mask')


def test_builds_offline_with_split_sizes(data_dir):
  builder = tfds.builder('deeplab_shapes/tiny', data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 24
  assert builder.info.splits['validation'].num_examples == 8
  default = shapes.DeeplabShapes.BUILDER_CONFIGS[0]
  assert (default.name, default.num_train, default.num_validation) == ('default', 1000, 100)


def test_examples_labels_and_ignore_band(data_dir):
  config = shapes.DeeplabShapes.builder_configs['tiny']
  examples = _examples(data_dir, 'train')
  assert len(examples) == 24
  seen = set()
  for name, ex in examples.items():
    image, mask = ex['image'], ex['segmentation_mask']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] + (1,), name
    assert config.min_side <= min(image.shape[:2]) and max(image.shape[:2]) <= config.max_side
    label = mask[..., 0]
    values = set(np.unique(label).tolist())
    assert values <= set(range(6)) | {255}, (name, values)
    seen |= values
    # The band separates every pair of different classes: no two 4-neighbours carry different
    # class ids; each ignore pixel touches a real label.
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
      both_real = (a != 255) & (b != 255)
      assert np.all(a[both_real] == b[both_real]), name
    if np.any(label == 255):
      assert np.any((label > 0) & (label < 255)), name
  assert seen == set(range(6)) | {255}


def test_stored_examples_match_generator_and_rebuild(data_dir, tmp_path):
  config = shapes.DeeplabShapes.builder_configs['tiny']
  first = _examples(data_dir, 'validation')
  second = _examples(tmp_path, 'validation')  # A second, independent build.
  assert first.keys() == second.keys() == {f'validation_{i:05d}.png' for i in range(8)}
  for name in first:
    np.testing.assert_array_equal(first[name]['image'], second[name]['image'])
    np.testing.assert_array_equal(first[name]['segmentation_mask'],
                                  second[name]['segmentation_mask'])
  image, label = shapes.generate_example(config, 1, 3)
  np.testing.assert_array_equal(first['validation_00003.png']['image'], image)
  np.testing.assert_array_equal(first['validation_00003.png']['segmentation_mask'][..., 0], label)


def test_default_config_is_balanced_enough():
  """Every object class appears in a sample of the real config, objects cover a useful share."""
  config = shapes.DeeplabShapes.builder_configs['default']
  labels = np.concatenate([shapes.generate_example(config, 0, i)[1].ravel() for i in range(40)])
  counts = np.bincount(labels, minlength=256)
  fractions = counts[1:6] / labels.size
  assert np.all(fractions > 0.005), fractions
  assert 0.01 < counts[255] / labels.size < 0.15
  assert set(np.flatnonzero(counts)) == set(range(6)) | {255}
