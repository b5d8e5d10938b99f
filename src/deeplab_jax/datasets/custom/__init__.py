"""Your own images and masks as a TFDS dataset, and a checker for them.

Folder layout (ROOT):

  ROOT/images/<stem>.{jpg,jpeg,png}   RGB (or grayscale) images
  ROOT/masks/<stem>.png               class indices, one per pixel: single-channel ('L') or palette
                                      ('P', the indices are read, never the colours); 255 = ignore
  ROOT/splits/train.txt, val.txt      one stem per line; any other `splits/<name>.txt` becomes a
                                      split `<name>` too ('val' is stored as 'validation')
  ROOT/classes.txt                    optional: one class name per line, line i = class i; it fixes
                                      the number of classes (else give --num_classes)

Check the folder before training (reports every bad file: unreadable or missing images and masks,
colour masks, image/mask size mismatches, label values outside [0, num_classes) other than 255):

  python -m deeplab_jax.tools.check_dataset --root=ROOT [--num_classes=N]

Build it as TFDS dataset NAME (lower_snake_case, not a name TFDS or deeplab_jax already uses):

  python -m deeplab_jax.tools.build_dataset custom --root=ROOT --name=NAME --data_dir=DIR \
      [--num_classes=N]

The build fails on the first bad file (naming the file and the problem) and then leaves nothing in
DIR that would load. Train with `config.data.dataset=NAME`, `config.data.data_dir=DIR`; the number
of classes and their names are stored in the dataset's metadata and read back by `get_spec(name, data_dir)`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from deeplab_jax.datasets import builder_io
from deeplab_jax.datasets.builder_io import checked_example, read_mask
from deeplab_jax.datasets.spec import DatasetSpec, get_spec
from deeplab_jax.errors import DatasetError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


@dataclasses.dataclass(frozen=True)
class Problem:
  """One finding of the checker: `path` (relative to ROOT) and what is wrong with it."""

  path: str
  message: str
  fatal: bool = True

  def __str__(self) -> str:
    return f'{"ERROR" if self.fatal else "warning"}: {self.path}: {self.message}'


@dataclasses.dataclass
class CheckReport:
  """What `check_folder` found: problems, split sizes and pixels per label value."""

  problems: list[Problem]
  splits: dict[str, list[str]]
  num_classes: int
  class_names: tuple[str, ...]
  pixel_counts: np.ndarray  # (256,) int64: pixels per stored mask value over all checked masks.

  @property
  def ok(self) -> bool:
    return not any(p.fatal for p in self.problems)


def split_name(file_stem: str) -> str:
  """TFDS split name of `splits/<file_stem>.txt` ('val' -> 'validation')."""
  return 'validation' if file_stem == 'val' else file_stem


def read_classes(root: str, num_classes: int | None = None) -> tuple[str, ...]:
  """Class names from ROOT/classes.txt, or 'class_<i>' for `num_classes` classes without it."""
  path = os.path.join(root, 'classes.txt')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      names = tuple(line.strip() for line in f if line.strip())
    if not names:
      raise DatasetError(f'{path}: no class names')
    if len(names) > 255:
      raise DatasetError(f'{path}: {len(names)} classes; at most 255 (255 is the ignore label)')
    if num_classes is not None and num_classes != len(names):
      raise DatasetError(f'{path}: {len(names)} class names but num_classes={num_classes}')
    return names
  if num_classes is None:
    raise DatasetError(f'{path} is missing: give the number of classes (--num_classes)')
  if not 1 <= num_classes <= 255:
    raise DatasetError(f'num_classes={num_classes}: must be in [1, 255] (255 is the ignore label)')
  return tuple(f'class_{i}' for i in range(num_classes))


def _image_paths(root: str) -> tuple[dict[str, str], list[Problem]]:
  """{stem: path relative to ROOT} of ROOT/images, and problems (stems with two images)."""
  images, problems = {}, []
  image_dir = os.path.join(root, 'images')
  if not os.path.isdir(image_dir):
    return {}, [Problem('images/', 'folder is missing')]
  for fname in sorted(os.listdir(image_dir)):
    stem, ext = os.path.splitext(fname)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    rel = f'images/{fname}'
    if stem in images:
      problems.append(Problem(rel, f'a second image for stem {stem!r} (also {images[stem]})'))
    else:
      images[stem] = rel
  return images, problems


def _read_splits(root: str) -> tuple[dict[str, list[str]], list[Problem]]:
  """{split name: stems} from ROOT/splits/*.txt, and problems with the split files."""
  split_dir = os.path.join(root, 'splits')
  splits, problems = {}, []
  names = sorted(f for f in os.listdir(split_dir) if f.endswith('.txt')) if os.path.isdir(
      split_dir) else []
  for fname in names:
    stem = fname[:-4]
    if not re.fullmatch(r'\w+', stem):
      problems.append(Problem(f'splits/{fname}', 'split names may only hold letters, digits, _'))
      continue
    with open(os.path.join(split_dir, fname), encoding='utf-8') as f:
      stems = [line.strip() for line in f if line.strip()]
    if not stems:
      problems.append(Problem(f'splits/{fname}', 'lists no images'))
    if len(set(stems)) != len(stems):
      problems.append(Problem(f'splits/{fname}', 'lists a stem more than once'))
      stems = list(dict.fromkeys(stems))
    splits[split_name(stem)] = stems
  for required in ('train', 'val'):
    if split_name(required) not in splits:
      problems.append(Problem(f'splits/{required}.txt', 'split file is missing'))
  if 'train' in splits and 'validation' in splits:
    both = sorted(set(splits['train']) & set(splits['validation']))
    if both:
      problems.append(Problem('splits/val.txt', f'{len(both)} stems also in train.txt, e.g. '
                              f'{both[0]!r}', fatal=False))
  return splits, problems


def _load_example(root: str, stem: str, image_rel: str | None,
                  num_classes: int) -> tuple[dict, np.ndarray]:
  """The checked TFDS example of `stem` and its mask; DatasetError names the bad file."""
  if image_rel is None:
    raise DatasetError(f'images/{stem}.{{jpg,jpeg,png}}: no image for this stem (listed in a '
                       'split)')
  mask_rel = f'masks/{stem}.png'
  if not os.path.isfile(os.path.join(root, mask_rel)):
    raise DatasetError(f'{mask_rel}: missing mask for {image_rel}')
  with open(os.path.join(root, image_rel), 'rb') as f:
    image = f.read()
  with open(os.path.join(root, mask_rel), 'rb') as f:
    mask = read_mask(f.read(), mask_rel)
  return checked_example(image, mask, stem, image_rel, mask_rel, num_classes), mask


def check_folder(root: str, num_classes: int | None = None) -> CheckReport:
  """Checks every image and mask of a custom dataset folder; reports all problems at once."""
  root = os.fspath(root)
  problems: list[Problem] = []
  try:
    class_names = read_classes(root, num_classes)
  except DatasetError as e:
    return CheckReport([Problem('classes.txt', str(e))], {}, 0, (), np.zeros(256, np.int64))
  images, found = _image_paths(root)
  problems += found
  splits, found = _read_splits(root)
  problems += found
  counts = np.zeros(256, np.int64)
  stems = list(dict.fromkeys([*images, *(s for v in splits.values() for s in v)]))
  for stem in stems:
    try:
      _, mask = _load_example(root, stem, images.get(stem), len(class_names))
    except DatasetError as e:
      path, _, message = str(e).partition(': ')
      problems.append(Problem(path, message))
      continue
    counts += np.bincount(mask.ravel(), minlength=256)
  listed = {s for v in splits.values() for s in v}
  unlisted = [s for s in images if s not in listed]
  if unlisted:
    problems.append(Problem('splits/', f'{len(unlisted)} images in no split, e.g. '
                            f'{images[unlisted[0]]}', fatal=False))
  return CheckReport(problems, splits, len(class_names), class_names, counts)


class CustomSegmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A custom dataset folder; `builder()` makes a subclass named after the user's dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}

  def __init__(self, *, root: str, class_names: Sequence[str], **kwargs):
    self._root = os.fspath(root)
    self._class_names = tuple(class_names)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_io.segmentation_info(
        self, f'Custom segmentation dataset from {self._root}.',
        metadata=tfds.core.MetadataDict(deeplab_custom_segmentation=True,
                                        num_classes=len(self._class_names),
                                        class_names=list(self._class_names)))

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    images, problems = _image_paths(self._root)
    splits, split_problems = _read_splits(self._root)
    problems = [p for p in problems + split_problems if p.fatal]
    if problems:
      raise DatasetError(str(problems[0]).removeprefix('ERROR: '))
    return {name: self._generate_examples(stems, images) for name, stems in splits.items()}

  def _generate_examples(self, stems: list[str], images: dict[str, str]) -> Iterator:
    for stem in stems:
      yield stem, _load_example(self._root, stem, images.get(stem), len(self._class_names))[0]


def _check_name(name: str) -> None:
  """Rejects dataset names TFDS cannot store or that would load another dataset."""
  if not _NAME_RE.match(name):
    raise DatasetError(f'dataset name {name!r}: use lower_snake_case (a-z, 0-9, _)')
  try:
    get_spec(name)
    taken = True
  except ValueError:
    taken = name in tfds.list_builders(with_community_datasets=False)
  if taken:
    raise DatasetError(f'dataset name {name!r} is already a TFDS or deeplab_jax dataset; pick '
                     'another')


def builder(name: str, root: str, data_dir: str | None = None,
            num_classes: int | None = None) -> CustomSegmentation:
  """A TFDS builder that writes folder `root` as dataset `name` under `data_dir`."""
  _check_name(name)
  class_names = read_classes(os.fspath(root), num_classes)
  cls = types.new_class(
      'CustomSegmentation_' + name, (CustomSegmentation,), {'skip_registration': True},
      lambda ns: ns.update(name=name, __module__=__name__))
  return cls(root=root, class_names=class_names, data_dir=data_dir)


def build(name: str, root: str, data_dir: str | None = None,
          num_classes: int | None = None) -> DatasetSpec:
  """Builds folder `root` as TFDS dataset `name` in `data_dir`; returns its registered spec."""
  b = builder(name, root, data_dir, num_classes)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return get_spec(name, data_dir)
