"""Custom folder datasets: build, spec from metadata, the checker on a deliberately bad folder."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from deeplab_jax.datasets import custom, get_spec, spec
from deeplab_jax.errors import DatasetError
from deeplab_jax.tools import app, build_dataset, check_dataset

H, W = 32, 48
CLASSES = ('background', 'crop', 'road')


def _mask(seed: int) -> np.ndarray:
  mask = np.random.default_rng(seed).integers(0, len(CLASSES), (H, W), dtype=np.uint8)
  mask[:2] = 255
  return mask


def _save_image(path, seed: int, size=(H, W)) -> None:
  rng = np.random.default_rng(seed)
  PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _save_mask(path, mask: np.ndarray, palette: bool = False) -> None:
  img = PIL.Image.fromarray(mask, mode='P' if palette else 'L')
  if palette:  # Colours unlike the indices: reading colours instead of indices would show.
    img.putpalette([(i * 37 + 11) % 256 for i in range(768)])
  img.save(path)


def make_folder(root, n: int = 10) -> None:
  """n images (jpg and png; L and palette masks), 7 train / 3 val, classes.txt."""
  for sub in ('images', 'masks', 'splits'):
    os.makedirs(root / sub, exist_ok=True)
  stems = [f'field_{i:02d}' for i in range(n)]
  for i, stem in enumerate(stems):
    _save_image(root / 'images' / f'{stem}.{"png" if i % 3 == 0 else "jpg"}', i)
    _save_mask(root / 'masks' / f'{stem}.png', _mask(i), palette=i % 2 == 1)
  (root / 'splits' / 'train.txt').write_text('\n'.join(stems[:7]) + '\n')
  (root / 'splits' / 'val.txt').write_text('\n'.join(stems[7:]) + '\n')
  (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')


@pytest.fixture(autouse=True)
def _forget_custom_specs():
  """Specs registered by a test do not leak into the next."""
  before = dict(spec._SPECS)
  yield
  spec._SPECS.clear()
  spec._SPECS.update(before)


def test_build_and_load(tmp_path):
  make_folder(tmp_path / 'root')
  data_dir = str(tmp_path / 'data')
  app.call(build_dataset, ['custom', '--root', str(tmp_path / 'root'), '--name', 'my_fields',
                           '--data_dir', data_dir])
  # A fresh process knows nothing of `my_fields`: the spec comes back from the dataset's metadata.
  spec._SPECS.pop('my_fields')
  s = get_spec('my_fields', data_dir)
  assert (s.num_classes, s.class_names, s.label_map) == (3, CLASSES, None)
  assert (s.image_key, s.label_key) == ('image', 'segmentation_mask')
  assert get_spec('my_fields') is s
  builder = tfds.builder('my_fields', data_dir=data_dir)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 7, 'validation': 3}
  for ex in tfds.as_numpy(builder.as_dataset(split='train')):
    i = int(ex['file_name'].decode().split('_')[1])
    assert ex['image'].shape == (H, W, 3)
    np.testing.assert_array_equal(ex['segmentation_mask'][..., 0], _mask(i))  # L and palette.


def test_get_spec_unknown_dataset_keeps_the_helpful_error(tmp_path):
  with pytest.raises(ValueError, match='deeplab_jax.datasets.custom'):
    get_spec('never_built', str(tmp_path))


def _bad_folder(root) -> dict[str, str]:
  """A folder with one problem per file; returns {path: expected message fragment}."""
  make_folder(root)
  img, msk = root / 'images', root / 'masks'
  (img / 'field_01.jpg').write_bytes((img / 'field_01.jpg').read_bytes()[:300])  # Truncated.
  _save_image(img / 'field_02.jpg', 2, size=(H, W - 8))  # Smaller than its mask.
  bad = _mask(4)
  bad[5, 5], bad[6, 6] = 3, 200
  _save_mask(msk / 'field_04.png', bad)
  os.remove(msk / 'field_05.png')
  rgb = np.stack([_mask(7) * 40, _mask(7), _mask(7)], axis=-1)
  PIL.Image.fromarray(rgb.astype(np.uint8)).save(msk / 'field_07.png')
  (img / 'field_08.jpg').write_bytes(b'not an image at all')
  with open(root / 'splits' / 'val.txt', 'a') as f:
    f.write('field_99\n')
  buf = io.BytesIO()
  PIL.Image.fromarray(_mask(9)).save(buf, format='JPEG')
  (msk / 'field_09.png').write_bytes(buf.getvalue())
  return {
      'images/field_01.jpg': 'unreadable image',
      'masks/field_02.png': 'mask is 32x48 but its image is 32x40',
      'masks/field_04.png': 'label values 3, 200 outside [0, 3) and 255 (ignore)',
      'masks/field_05.png': 'missing mask for images/field_05.jpg',
      'masks/field_07.png': 'colour (RGB) mask',
      'images/field_08.jpg': 'unreadable image (UnidentifiedImageError',
      'images/field_99.{jpg,jpeg,png}': 'no image for this stem',
      'masks/field_09.png': 'mask is JPEG, not PNG',
  }


def test_checker_reports_every_bad_file(tmp_path, capsys):
  expected = _bad_folder(tmp_path / 'root')
  report = custom.check_folder(tmp_path / 'root')
  assert not report.ok
  found = {p.path: p.message for p in report.problems if p.fatal}
  assert set(found) == set(expected)
  for path, fragment in expected.items():
    assert fragment in found[path], (path, found[path])
  assert app.call(check_dataset, ['--root', str(tmp_path / 'root')]) == 1
  out = capsys.readouterr().out
  assert 'ERROR: masks/field_04.png: label values 3, 200' in out and '8 errors' in out
  # A smaller num_classes than classes.txt is a mismatch, not a silent override.
  assert not custom.check_folder(tmp_path / 'root', num_classes=2).ok


def test_checker_on_a_good_folder_and_num_classes_without_classes_txt(tmp_path):
  make_folder(tmp_path / 'root')
  os.remove(tmp_path / 'root' / 'classes.txt')
  with pytest.raises(DatasetError, match='--num_classes'):
    custom.read_classes(str(tmp_path / 'root'))
  report = custom.check_folder(tmp_path / 'root', num_classes=3)
  assert report.ok and not report.problems
  assert report.class_names == ('class_0', 'class_1', 'class_2')
  assert {k: len(v) for k, v in report.splits.items()} == {'train': 7, 'validation': 3}
  assert report.pixel_counts[255] == 10 * 2 * W and report.pixel_counts[3:255].sum() == 0
  assert not custom.check_folder(tmp_path / 'root', num_classes=2).ok  # Label 2 now out of range.


def test_build_fails_on_bad_folder_and_leaves_nothing(tmp_path):
  _bad_folder(tmp_path / 'root')
  data_dir = str(tmp_path / 'data')
  with pytest.raises(DatasetError, match=re.escape('images/field_01.jpg: unreadable image')):
    custom.build('bad_fields', str(tmp_path / 'root'), data_dir)
  assert not list((tmp_path / 'data').glob('bad_fields/*'))
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder('bad_fields', data_dir=data_dir)


@pytest.mark.parametrize('name', ['voc2012_segmentation', 'mnist', 'My-Data', 'cityscapes'])
def test_dataset_names_that_would_clash_are_refused(tmp_path, name):
  make_folder(tmp_path / 'root', n=2)
  with pytest.raises(ValueError, match='dataset name'):
    custom.builder(name, str(tmp_path / 'root'), str(tmp_path / 'data'))


def test_module_entry_point(tmp_path):
  """The older command `python -m deeplab_jax.datasets.custom check` still runs the checker."""
  make_folder(tmp_path / 'root')
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.datasets.custom', 'check', f'--root={tmp_path / "root"}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert '0 errors' in result.stdout
