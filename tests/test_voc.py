"""voc2012_segmentation: built from fake VOC 2012 and SBD archives in their real on-disk layout."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import PIL.Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from deeplab_jax.datasets import get_spec, voc
from deeplab_jax.errors import DatasetError
from deeplab_jax.tools import app, build_dataset

H, W = 32, 48
VOC_TRAIN = ['2007_000001', '2007_000002', '2007_000003', '2008_000004']
VOC_VAL = ['2007_000010', '2007_000011', '2009_000012']
SBD_TRAIN = ['2008_000100', '2008_000101', '2007_000001', '2007_000010']  # Overlaps VOC train, val.
SBD_VAL = ['2008_000102', '2007_000002', '2011_000200']  # 2011_000200: image only in SBD img/.
SBD_ONLY_IMAGE = '2011_000200'


def _palette() -> list[int]:
  """A VOC-like colour map: index i gets a colour unlike i, so reading colours would show."""
  pal = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal += [r, g, b]
  return pal


def _jpeg(seed: int, size: tuple[int, int] = (H, W)) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format='JPEG')
  return buf.getvalue()


def voc_mask(seed: int) -> np.ndarray:
  """Classes 0..20 with a 255 boundary frame, like VOC's SegmentationClass."""
  mask = np.random.default_rng(seed).integers(0, 21, (H, W), dtype=np.uint8)
  mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255
  return mask


def sbd_seg(seed: int) -> np.ndarray:
  return np.random.default_rng(1000 + seed).integers(0, 21, (H, W), dtype=np.uint8)


def _png_p(mask: np.ndarray) -> bytes:
  img = PIL.Image.fromarray(mask, mode='P')
  img.putpalette(_palette())
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  return buf.getvalue()


def _mat(seg: np.ndarray) -> bytes:
  buf = io.BytesIO()
  present = np.unique(seg[seg > 0]).astype(np.uint8)[:, None]
  scipy.io.savemat(buf, {'GTcls': {'Segmentation': seg, 'CategoriesPresent': present}})
  return buf.getvalue()


def _write_tar(path, members: dict[str, bytes], mode: str) -> None:
  with tarfile.open(path, mode) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _seed(image_id: str) -> int:
  return int(image_id.replace('_', ''))


def make_archives(manual_dir, voc_overrides: dict | None = None,
                  sbd_overrides: dict | None = None) -> None:
  """Writes the fake archives; `*_overrides` replace (value bytes) or drop (value None) members."""
  manual_dir.mkdir(parents=True, exist_ok=True)
  root = 'VOCdevkit/VOC2012/'
  vm: dict[str, bytes] = {}
  sbd_ids = sorted(set(SBD_TRAIN + SBD_VAL))
  for image_id in sorted(set(VOC_TRAIN + VOC_VAL + sbd_ids) - {SBD_ONLY_IMAGE}):
    vm[f'{root}JPEGImages/{image_id}.jpg'] = _jpeg(_seed(image_id))
  for image_id in VOC_TRAIN + VOC_VAL:
    vm[f'{root}SegmentationClass/{image_id}.png'] = _png_p(voc_mask(_seed(image_id)))
  for split, ids in (('train', VOC_TRAIN), ('val', VOC_VAL), ('trainval', VOC_TRAIN + VOC_VAL)):
    vm[f'{root}ImageSets/Segmentation/{split}.txt'] = ('\n'.join(ids) + '\n').encode()
  sm: dict[str, bytes] = {}
  sroot = 'benchmark_RELEASE/dataset/'
  for image_id in sbd_ids:
    sm[f'{sroot}cls/{image_id}.mat'] = _mat(sbd_seg(_seed(image_id)))
    sm[f'{sroot}img/{image_id}.jpg'] = _jpeg(_seed(image_id))
  sm[f'{sroot}train.txt'] = ('\n'.join(SBD_TRAIN) + '\n').encode()
  sm[f'{sroot}val.txt'] = ('\n'.join(SBD_VAL) + '\n').encode()
  for members, overrides in ((vm, voc_overrides), (sm, sbd_overrides)):
    for name, data in (overrides or {}).items():
      if data is None:
        members.pop(name)
      else:
        members[name] = data
  _write_tar(manual_dir / voc.VOC_ARCHIVE, vm, 'w')
  _write_tar(manual_dir / voc.SBD_ARCHIVE, sm, 'w:gz')


def _read_split(builder, split: str) -> dict[str, dict]:
  return {ex['file_name'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('voc')
  make_archives(tmp / 'manual')
  app.call(build_dataset, ['voc', '--manual_dir', str(tmp / 'manual'),
                           '--data_dir', str(tmp / 'data')])
  return tfds.builder(voc.NAME, data_dir=str(tmp / 'data'))


def test_split_sizes_and_train_aug_arithmetic(built):
  expected_aug = (set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL)
  sizes = {name: s.num_examples for name, s in built.info.splits.items()}
  assert sizes == {'train': 4, 'validation': 3, 'trainval': 7, 'train_aug': len(expected_aug)}
  assert set(_read_split(built, 'train_aug')) == expected_aug
  assert set(_read_split(built, 'validation')) == set(VOC_VAL)
  assert voc.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == sorted(expected_aug)


def test_masks_are_palette_indices_and_sbd_masks_come_through(built):
  aug = _read_split(built, 'train_aug')
  for image_id, ex in aug.items():
    assert ex['image'].shape == (H, W, 3) and ex['image'].dtype == np.uint8
    assert ex['segmentation_mask'].shape == (H, W, 1)
    if image_id in VOC_TRAIN:  # VOC's mask wins over SBD's, 255 boundaries kept.
      np.testing.assert_array_equal(ex['segmentation_mask'][..., 0], voc_mask(_seed(image_id)))
    else:
      np.testing.assert_array_equal(ex['segmentation_mask'][..., 0], sbd_seg(_seed(image_id)))
  val = _read_split(built, 'validation')['2007_000010']['segmentation_mask'][..., 0]
  np.testing.assert_array_equal(val, voc_mask(_seed('2007_000010')))
  assert 255 in val and val[val != 255].max() <= 20


def test_spec():
  spec = get_spec('voc2012_segmentation')
  assert spec.num_classes == 21
  assert spec.class_names[0] == 'background' and spec.class_names[-1] == 'tvmonitor'
  assert spec.label_map is None


_BAD = 'VOCdevkit/VOC2012/'


@pytest.mark.parametrize('voc_overrides,sbd_overrides,message', [
    ({f'{_BAD}JPEGImages/2007_000002.jpg': _jpeg(2)[:200]}, None,
     f'{_BAD}JPEGImages/2007_000002.jpg: unreadable image'),
    ({f'{_BAD}JPEGImages/2007_000002.jpg': _jpeg(2, (H, W + 2))}, None,
     f'{_BAD}SegmentationClass/2007_000002.png: mask is 32x48 but its image is 32x50'),
    ({f'{_BAD}SegmentationClass/2007_000003.png': _png_p(np.full((H, W), 21, np.uint8))}, None,
     f'{_BAD}SegmentationClass/2007_000003.png: label values 21 outside [0, 21)'),
    ({f'{_BAD}SegmentationClass/2007_000003.png': None}, None,
     f'no member {_BAD}SegmentationClass/2007_000003.png'),
    (None, {'benchmark_RELEASE/dataset/val.txt': None},
     'no member benchmark_RELEASE/dataset/val.txt'),
    (None, {'benchmark_RELEASE/dataset/cls/2008_000100.mat': b'MATLAB junk'},
     'benchmark_RELEASE/dataset/cls/2008_000100.mat: unreadable SBD .mat'),
])
def test_bad_input_fails_naming_file_and_leaves_no_dataset(tmp_path, voc_overrides, sbd_overrides,
                                                           message):
  make_archives(tmp_path / 'manual', voc_overrides, sbd_overrides)
  with pytest.raises(DatasetError, match=re.escape(message)):
    voc.build(str(tmp_path / 'data'), str(tmp_path / 'manual'))
  again = tfds.builder(voc.NAME, data_dir=str(tmp_path / 'data'))
  assert not again.is_prepared()
  assert not list((tmp_path / 'data').glob(f'{voc.NAME}/*'))  # No (incomplete) version dir left.
  with pytest.raises(AssertionError, match='could not find data'):
    again.as_dataset(split='train')
