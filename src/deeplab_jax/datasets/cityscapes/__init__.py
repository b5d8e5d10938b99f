"""Cityscapes (fine annotations, 19 classes) through TFDS's own `cityscapes` builder.

TFDS config `cityscapes/semantic_segmentation` stores `image_left` (1024x2048 RGB) and
`segmentation_label` (1024x2048x1: the 34 Cityscapes *labelIds* of gtFine_labelIds.png); splits
train (2,975), validation (500), test (1,525, no labels). Training uses the 19 *trainIds*: the
spec's `label_map` sends the 19 evaluated labelIds to 0..18 and every other value (unlabeled, ego
vehicle, rectification border, out of roi, static, dynamic, ground, parking, rail track, guard rail,
bridge, tunnel, polegroup, caravan, trailer, license plate) to 255 (ignored), as the official
DeepLab does (it trains on cityscapesScripts' labelTrainIds images, the same mapping).

Build (needs leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
https://www.cityscapes-dataset.com (registration) in MANUAL_DIR; TFDS extracts them, ~12 GB):

  python -m deeplab_jax.tools.build_dataset cityscapes --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

and train with `config.data.dataset='cityscapes/semantic_segmentation'`. TFDS's builder does no
input checks of its own beyond its fixed 1024x2048 shapes.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.datasets import builder_io
from deeplab_jax.datasets.spec import IGNORE_LABEL, DatasetSpec, register

NAME = 'cityscapes'
CONFIG = 'semantic_segmentation'

# (labelId, trainId, name) of the 19 evaluated classes (cityscapesScripts' labels.py).
TRAIN_CLASSES = (
    (7, 0, 'road'), (8, 1, 'sidewalk'), (11, 2, 'building'), (12, 3, 'wall'), (13, 4, 'fence'),
    (17, 5, 'pole'), (19, 6, 'traffic light'), (20, 7, 'traffic sign'), (21, 8, 'vegetation'),
    (22, 9, 'terrain'), (23, 10, 'sky'), (24, 11, 'person'), (25, 12, 'rider'), (26, 13, 'car'),
    (27, 14, 'truck'), (28, 15, 'bus'), (31, 16, 'train'), (32, 17, 'motorcycle'),
    (33, 18, 'bicycle'))
CLASS_NAMES = tuple(name for _, _, name in TRAIN_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)


def label_map() -> np.ndarray:
  """Stored labelId -> trainId (0..18); all other values -> 255."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id, _ in TRAIN_CLASSES:
    lut[label_id] = train_id
  return lut


SPEC = register(DatasetSpec(NAME, NUM_CLASSES, CLASS_NAMES, image_key='image_left',
                            label_key='segmentation_label', label_map=label_map()))


def build(data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds `cityscapes/semantic_segmentation` in `data_dir` from the zips in `manual_dir`."""
  return builder_io.prepare(f'{NAME}/{CONFIG}', data_dir, manual_dir)
