"""ADE20K (MIT Scene Parsing, 150 classes) as TFDS dataset `ade20k`, from ADEChallengeData2016.zip.

Why not TFDS's `scene_parse150`: in tensorflow-datasets 4.9.10 it reads the 2017 *instance*
annotations (annotations_instance.tar: an RGB PNG whose R channel is one of 100 object categories,
with every "stuff" class such as wall, sky or floor at 0) and names its validation images 'test'.
The 150-class semantic benchmark that DeepLab reports on is ADEChallengeData2016.zip, which this
builder reads (the archive the official DeepLab scripts convert).

Splits: train (20,210), validation (2,000). Features: `image`, `segmentation_mask` ((H, W, 1) uint8,
the stored values: 0 = "other objects", 1..150 = classes), `file_name` (e.g. 'ADE_val_00000001').
The DatasetSpec's `label_map` does what the official DeepLab does: 0 -> 255 (ignored), c -> c - 1,
so the model predicts 150 classes 0..149.

Build (ADEChallengeData2016.zip in MANUAL_DIR, else downloaded from the official URL):

  python -m deeplab_jax.tools.build_dataset ade20k --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

The zip is read in place. An unreadable image or annotation, an image/annotation size mismatch, a
value above 150 or an image without annotation stops the build with an error naming the member;
nothing is left behind.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.datasets import builder_io
from deeplab_jax.datasets.spec import IGNORE_LABEL, DatasetSpec, register
from deeplab_jax.errors import DatasetError

NAME = 'ade20k'
ARCHIVE = 'ADEChallengeData2016.zip'
URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'

# objectInfo150.txt of the scene parsing devkit, first name of each entry, in index order 1..150.
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel',
    'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step',
    'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')
NUM_CLASSES = len(CLASS_NAMES)


def label_map() -> np.ndarray:
  """Stored value -> training label: 0 (other) -> 255, c -> c - 1 for c in 1..150, rest -> 255."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  lut[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
  return lut


SPEC = register(DatasetSpec(NAME, NUM_CLASSES, CLASS_NAMES, label_map=label_map()))

_MEMBER = re.compile(r'(?:^|/)ADEChallengeData2016/(images|annotations)/(training|validation)/'
                     r'([^/]+)\.(jpg|png)$')
_SPLITS = {'training': 'train', 'validation': 'validation'}


def _open(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DatasetError(f'{ARCHIVE}: unreadable zip archive ({type(e).__name__}: {e})') from e


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
  try:
    return archive.read(name)
  except (zipfile.BadZipFile, OSError, EOFError) as e:  # e.g. a bad CRC.
    raise DatasetError(f'{ARCHIVE}:{name}: unreadable member ({e})') from e


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K scene parsing (150 classes) from ADEChallengeData2016.zip; see the module docstring."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'ADEChallengeData2016 train and validation.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put {ARCHIVE} ({URL}) in the manual dir (do not extract it).'

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_io.segmentation_info(
        self, 'ADE20K scene parsing benchmark (ADEChallengeData2016): masks hold 0 = other, '
        '1..150 = classes.',
        homepage='http://sceneparsing.csail.mit.edu/')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = builder_io.archive_paths(dl_manager, {'ade': (ARCHIVE, URL)})['ade']
    members: dict[str, dict[str, dict[str, str]]] = {s: {} for s in _SPLITS.values()}
    with _open(path) as archive:
      for name in archive.namelist():
        match = _MEMBER.search(name)
        if match and (match.group(1) == 'images') == (match.group(4) == 'jpg'):
          kind, folder, stem = match.group(1, 2, 3)
          members[_SPLITS[folder]].setdefault(stem, {})[kind] = name
    for split, entries in members.items():
      if not entries:
        folder = next(f for f, s in _SPLITS.items() if s == split)
        raise DatasetError(f'{ARCHIVE}: no members ADEChallengeData2016/images/{folder}/*.jpg')
    return {split: self._generate_examples(path, entries) for split, entries in members.items()}

  def _generate_examples(self, path: str, entries: dict[str, dict[str, str]]) -> Iterator:
    with _open(path) as archive:
      for stem in sorted(entries):
        names = entries[stem]
        if 'images' not in names:
          raise DatasetError(f'{ARCHIVE}:{names["annotations"]}: annotation without image '
                             f'(no {stem}.jpg)')
        if 'annotations' not in names:
          raise DatasetError(f'{ARCHIVE}:{names["images"]}: image without annotation (no member '
                             f'{names["images"].replace("/images/", "/annotations/")[:-4]}.png)')
        mask_name = f'{ARCHIVE}:{names["annotations"]}'
        mask = builder_io.read_mask(_read(archive, names['annotations']), mask_name)
        yield stem, builder_io.checked_example(
            _read(archive, names['images']), mask, stem, f'{ARCHIVE}:{names["images"]}',
            mask_name, NUM_CLASSES + 1, allow_ignore=False)


def build(data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds `ade20k` in `data_dir` from ADEChallengeData2016.zip in `manual_dir`."""
  builder_io.require_archives(manual_dir, [ARCHIVE])
  return builder_io.prepare(NAME, data_dir, manual_dir)
