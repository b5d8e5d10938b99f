"""PASCAL VOC 2012 segmentation with the SBD augmentation, as TFDS dataset `voc2012_segmentation`.

TFDS's own `voc` has no segmentation masks, hence this builder. Splits:

  train      1,464  VOC 2012 ImageSets/Segmentation/train.txt
  validation 1,449  VOC 2012 val.txt
  trainval   2,913  VOC 2012 trainval.txt
  train_aug 10,582  VOC train + SBD train + SBD val, minus VOC val (deduplicated): DeepLab's
                    training set

Features: `image` (the JPEG as stored), `segmentation_mask` ((H, W, 1) uint8: classes 0..20,
255 = object boundaries / difficult, ignored), `file_name` (the image id, e.g. '2007_000032'). A
mask comes from VOC's SegmentationClass (palette PNG; its palette indices are the classes) when VOC
has one, else from SBD's cls/<id>.mat (`GTcls.Segmentation`). Images come from VOC's JPEGImages,
else SBD's img/.

Build (put the official archives VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz in MANUAL_DIR;
without them the builder downloads them from the official URLs where there is internet):

  python -m deeplab_jax.tools.build_dataset voc --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

The archives are read in place (the VOC tar by random access, SBD's .tgz in one streaming pass),
never extracted. Bad input (an unreadable image or mask, an image/mask size mismatch, a label
outside 0..20 and 255, a member a split list names but the archive lacks) stops the build with an
error naming the archive member; TFDS then removes its temporary output, so no partial dataset
remains.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from deeplab_jax.datasets import builder_io
from deeplab_jax.datasets.spec import DatasetSpec, register
from deeplab_jax.errors import DatasetError

NAME = 'voc2012_segmentation'
VOC_ARCHIVE = 'VOCtrainval_11-May-2012.tar'
SBD_ARCHIVE = 'benchmark.tgz'
VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
SBD_URL = ('https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/'
           'benchmark.tgz')

CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')
NUM_CLASSES = len(CLASS_NAMES)

SPEC = register(DatasetSpec(NAME, NUM_CLASSES, CLASS_NAMES))

# Archive members, matched on the end of the path (a re-packed archive may have another top folder).
_VOC_JPEG = re.compile(r'(?:^|/)VOC2012/JPEGImages/([^/]+)\.jpg$')
_VOC_MASK = re.compile(r'(?:^|/)VOC2012/SegmentationClass/([^/]+)\.png$')
_VOC_LIST = re.compile(r'(?:^|/)VOC2012/ImageSets/Segmentation/(train|val|trainval)\.txt$')
_SBD_MAT = re.compile(r'(?:^|/)dataset/cls/([^/]+)\.mat$')
_SBD_JPEG = re.compile(r'(?:^|/)dataset/img/([^/]+)\.jpg$')
_SBD_LIST = re.compile(r'(?:^|/)dataset/(train|val)\.txt$')


def _ids(data: bytes) -> list[str]:
  """Image ids of a split list (one per line)."""
  return [line.strip() for line in data.decode('utf-8').splitlines() if line.strip()]


class _VocTar:
  """Random access by member name to VOC's (uncompressed) tar, plus its id indexes."""

  def __init__(self, path: str):
    try:
      self._tar = tarfile.open(path, 'r:*')
      members = [m for m in self._tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DatasetError(f'{VOC_ARCHIVE}: unreadable tar archive ({type(e).__name__}: {e})') from e
    self.by_name = {m.name.removeprefix('./'): m for m in members}
    self.jpeg, self.mask, self.lists = {}, {}, {}
    for name in self.by_name:
      for pattern, index in ((_VOC_JPEG, self.jpeg), (_VOC_MASK, self.mask),
                             (_VOC_LIST, self.lists)):
        match = pattern.search(name)
        if match:
          index[match.group(1)] = name

  def read(self, name: str) -> bytes:
    """The bytes of member `name`; DatasetError names it when it cannot be read."""
    try:
      return self._tar.extractfile(self.by_name[name]).read()
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DatasetError(f'{VOC_ARCHIVE}:{name}: unreadable member ({e})') from e

  def split_ids(self, split: str) -> list[str]:
    """Ids listed in ImageSets/Segmentation/<split>.txt."""
    if split not in self.lists:
      raise DatasetError(f'{VOC_ARCHIVE}: no member VOCdevkit/VOC2012/ImageSets/Segmentation/'
                         f'{split}.txt')
    return _ids(self.read(self.lists[split]))

  def close(self) -> None:
    self._tar.close()

  def __enter__(self) -> _VocTar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def sbd_mask(data: bytes, name: str) -> np.ndarray:
  """The class mask (H, W) uint8 of an SBD cls/*.mat file (MATLAB struct GTcls.Segmentation)."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data))  # MATLAB v5 format: no pickle involved.
    seg = np.asarray(mat['GTcls']['Segmentation'][0, 0])
  except Exception as e:  # scipy raises many types for bad files.
    raise DatasetError(f'{name}: unreadable SBD .mat, expected struct GTcls with field '
                       f'Segmentation ({type(e).__name__}: {e})') from e
  in_range = not seg.size or (seg.min() >= 0 and seg.max() <= 255)
  if seg.ndim != 2 or seg.dtype.kind not in 'ui' or not in_range:
    raise DatasetError(f'{name}: GTcls.Segmentation is {seg.dtype} {seg.shape}, expected a 2-D '
                       'integer class mask')
  return seg.astype(np.uint8)


def _read_sbd(path: str, skip_masks: set[str], have_images: set[str]) -> dict:
  """One streaming pass over SBD: split lists, masks (PNG bytes) and images not found elsewhere.

  Masks of `skip_masks` (ids with a VOC mask) are not decoded; images are kept only for ids not in
  `have_images` (VOC has every SBD image, so normally none).
  """
  lists, masks, images = {}, {}, {}
  try:
    with tarfile.open(path, 'r|*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        name = member.name.removeprefix('./')
        mat, jpeg, lst = _SBD_MAT.search(name), _SBD_JPEG.search(name), _SBD_LIST.search(name)
        if mat and mat.group(1) not in skip_masks:
          data = tar.extractfile(member).read()
          masks[mat.group(1)] = (name, builder_io.encode_mask(sbd_mask(data, f'{SBD_ARCHIVE}:{name}')))
        elif jpeg and jpeg.group(1) not in have_images:
          images[jpeg.group(1)] = (name, tar.extractfile(member).read())
        elif lst:
          lists[lst.group(1)] = _ids(tar.extractfile(member).read())
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DatasetError(f'{SBD_ARCHIVE}: unreadable archive ({type(e).__name__}: {e})') from e
  for split in ('train', 'val'):
    if split not in lists:
      raise DatasetError(f'{SBD_ARCHIVE}: no member benchmark_RELEASE/dataset/{split}.txt')
  return {'lists': lists, 'masks': masks, 'images': images}


def train_aug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str],
                  sbd_val: list[str]) -> list[str]:
  """DeepLab's train_aug: VOC train + SBD train + SBD val, minus VOC val, each id once (sorted)."""
  return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


class Voc2012Segmentation(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 segmentation + SBD (train_aug); see the module docstring."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VOC 2012 train/validation/trainval and train_aug (with SBD).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Put {VOC_ARCHIVE} ({VOC_URL}) and SBD\'s {SBD_ARCHIVE} ({SBD_URL}) in the manual dir, as '
      'downloaded (do not extract them).')

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_io.segmentation_info(
        self, 'PASCAL VOC 2012 semantic segmentation (21 classes, 255 = ignore) with the SBD '
        'augmented training set (train_aug).',
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = builder_io.archive_paths(dl_manager, {'voc': (VOC_ARCHIVE, VOC_URL),
                                                  'sbd': (SBD_ARCHIVE, SBD_URL)})
    with _VocTar(paths['voc']) as voc:
      lists = {split: voc.split_ids(split) for split in ('train', 'val', 'trainval')}
      voc_masks, voc_images = set(voc.mask), set(voc.jpeg)
    sbd = _read_sbd(paths['sbd'], skip_masks=voc_masks, have_images=voc_images)
    aug = train_aug_ids(lists['train'], lists['val'], sbd['lists']['train'], sbd['lists']['val'])
    voc_path = paths['voc']
    return {
        'train': self._generate_examples(voc_path, lists['train'], None),
        'validation': self._generate_examples(voc_path, lists['val'], None),
        'trainval': self._generate_examples(voc_path, lists['trainval'], None),
        'train_aug': self._generate_examples(voc_path, aug, sbd),
    }

  def _generate_examples(self, voc_path: str, ids: list[str], sbd: dict | None) -> Iterator:
    """Examples of `ids`; with `sbd` (train_aug) masks and images may come from SBD."""
    sbd_masks = sbd['masks'] if sbd else {}
    sbd_images = sbd['images'] if sbd else {}
    with _VocTar(voc_path) as voc:
      for image_id in ids:
        if image_id in voc.jpeg:
          image_name = voc.jpeg[image_id]
          image = voc.read(image_name)
          image_name = f'{VOC_ARCHIVE}:{image_name}'
        elif image_id in sbd_images:
          image_name, image = sbd_images[image_id]
          image_name = f'{SBD_ARCHIVE}:{image_name}'
        else:
          also = f' (nor dataset/img/{image_id}.jpg in {SBD_ARCHIVE})' if sbd else ''
          raise DatasetError(f'{VOC_ARCHIVE}: no member VOCdevkit/VOC2012/JPEGImages/'
                             f'{image_id}.jpg{also}')
        if image_id in voc.mask:
          mask_name = f'{VOC_ARCHIVE}:{voc.mask[image_id]}'
          mask = builder_io.read_mask(voc.read(voc.mask[image_id]), mask_name)
        elif image_id in sbd_masks:
          mask_name = f'{SBD_ARCHIVE}:{sbd_masks[image_id][0]}'
          mask = builder_io.read_mask(sbd_masks[image_id][1], mask_name)
        else:
          also = f' (nor dataset/cls/{image_id}.mat in {SBD_ARCHIVE})' if sbd else ''
          raise DatasetError(f'{VOC_ARCHIVE}: no member VOCdevkit/VOC2012/SegmentationClass/'
                             f'{image_id}.png{also}')
        yield image_id, builder_io.checked_example(image, mask, image_id, image_name, mask_name,
                                               NUM_CLASSES)


def build(data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds `voc2012_segmentation` in `data_dir` from the archives in `manual_dir`."""
  builder_io.require_archives(manual_dir, [VOC_ARCHIVE, SBD_ARCHIVE])
  return builder_io.prepare(NAME, data_dir, manual_dir)
