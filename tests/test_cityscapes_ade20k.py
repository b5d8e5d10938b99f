"""Cityscapes and ADE20K: label mappings, a TFDS mock_data smoke check, and the ade20k builder."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from deeplab_jax.datasets import ade20k, cityscapes, get_spec
from deeplab_jax.errors import DatasetError

H, W = 32, 48


def test_cityscapes_spec_and_label_map():
  spec = get_spec('cityscapes/semantic_segmentation')
  assert spec is cityscapes.SPEC
  assert (spec.image_key, spec.label_key) == ('image_left', 'segmentation_label')
  assert spec.num_classes == 19
  assert spec.class_names[:3] == ('road', 'sidewalk', 'building')
  assert spec.class_names[-1] == 'bicycle'
  lut = spec.label_map
  assert lut.shape == (256,) and lut.dtype == np.uint8
  label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
  np.testing.assert_array_equal(lut[label_ids], np.arange(19))
  others = np.setdiff1d(np.arange(256), label_ids)
  assert (lut[others] == 255).all()  # Incl. 0 unlabeled, 1 ego vehicle, 29 caravan, 30 trailer.
  masks = np.random.default_rng(0).integers(0, 34, (2, H, W), dtype=np.uint8)
  mapped = lut[masks]
  assert set(np.unique(mapped)) <= set(range(19)) | {255}
  assert ((mapped == 13) == (masks == 26)).all()  # car


def test_cityscapes_mock_data_smoke():
  """The spec's keys and split exist in TFDS's builder; the map applies in tf.data."""
  spec = cityscapes.SPEC
  lut = tf.constant(spec.label_map)
  with tfds.testing.mock_data(num_examples=1):
    ds = tfds.load('cityscapes/semantic_segmentation', split='train')
    ds = ds.map(lambda ex: (ex[spec.image_key],
                            tf.gather(lut, tf.cast(ex[spec.label_key], tf.int32))))
    (image, label), = tfds.as_numpy(ds)
  assert image.shape == (1024, 2048, 3) and label.shape == (1024, 2048, 1)
  assert set(np.unique(label)) <= set(range(19)) | {255}


def test_tfds_scene_parse150_is_not_the_150_class_benchmark(tmp_path):
  """Why `ade20k` has its own builder: scene_parse150 stores 3-channel instance annotations."""
  features = tfds.builder('scene_parse150', data_dir=str(tmp_path)).info.features
  assert features['annotation'].shape == (None, None, 3)


def test_ade20k_spec_and_label_map():
  spec = get_spec('ade20k')
  assert (spec.num_classes, len(spec.class_names)) == (150, 150)
  assert spec.class_names[0] == 'wall' and spec.class_names[-1] == 'flag'
  lut = spec.label_map
  assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[255] == 255
  np.testing.assert_array_equal(lut[1:151], np.arange(150))
  assert (lut[151:] == 255).all()


def _jpeg(seed: int, size=(H, W)) -> bytes:
  buf = io.BytesIO()
  rng = np.random.default_rng(seed)
  PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format='JPEG')
  return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(mask, mode='L').save(buf, format='PNG')
  return buf.getvalue()


def ade_mask(seed: int) -> np.ndarray:
  mask = np.random.default_rng(seed).integers(0, 151, (H, W), dtype=np.uint8)
  mask[0, 0], mask[0, 1] = 0, 150
  return mask


def make_ade_zip(manual_dir, overrides: dict | None = None) -> None:
  """ADEChallengeData2016.zip with 3 training and 2 validation images."""
  manual_dir.mkdir(parents=True, exist_ok=True)
  members = {'ADEChallengeData2016/objectInfo150.txt': b'Idx\tRatio\tTrain\tVal\tName\n'}
  for folder, prefix, n in (('training', 'ADE_train', 3), ('validation', 'ADE_val', 2)):
    for i in range(1, n + 1):
      stem = f'{prefix}_{i:08d}'
      seed = i + (100 if folder == 'validation' else 0)
      members[f'ADEChallengeData2016/images/{folder}/{stem}.jpg'] = _jpeg(seed)
      members[f'ADEChallengeData2016/annotations/{folder}/{stem}.png'] = _png(ade_mask(seed))
  for name, data in (overrides or {}).items():
    if data is None:
      members.pop(name)
    else:
      members[name] = data
  with zipfile.ZipFile(manual_dir / ade20k.ARCHIVE, 'w') as z:
    for name, data in members.items():
      z.writestr(name, data)


def test_ade20k_build(tmp_path):
  make_ade_zip(tmp_path / 'manual')
  builder = ade20k.build(str(tmp_path / 'data'), str(tmp_path / 'manual'))
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 3, 'validation': 2}
  examples = {ex['file_name'].decode(): ex
              for ex in tfds.as_numpy(builder.as_dataset(split='validation'))}
  assert set(examples) == {'ADE_val_00000001', 'ADE_val_00000002'}
  mask = examples['ADE_val_00000002']['segmentation_mask']
  assert mask.shape == (H, W, 1) and examples['ADE_val_00000002']['image'].shape == (H, W, 3)
  np.testing.assert_array_equal(mask[..., 0], ade_mask(102))  # Stored as in the archive.
  mapped = ade20k.SPEC.label_map[mask]
  assert mapped[0, 0, 0] == 255 and mapped[0, 1, 0] == 149 and mapped.max() == 255


_ANN = 'ADEChallengeData2016/annotations/training/ADE_train_00000002.png'


@pytest.mark.parametrize('overrides,message', [
    ({_ANN: _png(np.full((H, W), 151, np.uint8))}, f'{_ANN}: label values 151 outside [0, 151)'),
    ({_ANN: None}, 'ADEChallengeData2016/images/training/ADE_train_00000002.jpg: image without '
                   'annotation'),
    ({_ANN: _png(np.zeros((H + 1, W), np.uint8))}, f'{_ANN}: mask is 33x48 but its image is 32x48'),
])
def test_ade20k_bad_input(tmp_path, overrides, message):
  make_ade_zip(tmp_path / 'manual', overrides)
  with pytest.raises(DatasetError, match=re.escape(message)):
    ade20k.build(str(tmp_path / 'data'), str(tmp_path / 'manual'))
  assert not tfds.builder('ade20k', data_dir=str(tmp_path / 'data')).is_prepared()
