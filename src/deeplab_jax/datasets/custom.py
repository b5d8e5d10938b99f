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

  python -m deeplab_jax.datasets.custom check --root=ROOT [--num_classes=N]

Build it as TFDS dataset NAME (lower_snake_case, not a name TFDS or deeplab_jax already uses):

  python -m deeplab_jax.datasets.custom build --root=ROOT --name=NAME --data_dir=DIR \
      [--num_classes=N]

The build fails on the first bad file (naming the file and the problem) and then leaves nothing in
DIR that would load. Train with `config.data.dataset=NAME`, `config.data.data_dir=DIR`; the number
of classes and their names are stored in the dataset's metadata and read back by `get_spec(name, data_dir)`.

This module also holds the image and mask reading and checking that every builder of this package
uses, so that all of them reject bad input the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import sys
import types
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from deeplab_jax.datasets.spec import IGNORE_LABEL, DatasetSpec, get_spec

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class DatasetError(ValueError):
  """A bad input file; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Reading and checking images and masks (shared by all builders of this package).

# (format, mode) pairs TF's decoder reads as the same RGB pixels as PIL: stored unchanged.
_PASS_THROUGH = {('JPEG', 'RGB'), ('JPEG', 'L'), ('PNG', 'RGB'), ('PNG', 'RGBA'), ('PNG', 'L'),
                 ('PNG', 'P')}


def read_image(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
  """Decodes image bytes fully (so truncated or corrupt files fail here, not in training).

  Returns the bytes to store (JPEG/PNG as they are; other formats and modes, e.g. CMYK, re-encoded
  as RGB PNG) and the (height, width).
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as img:
      img.load()
      if (img.format, img.mode) not in _PASS_THROUGH:
        buf = io.BytesIO()
        img.convert('RGB').save(buf, format='PNG')
        data = buf.getvalue()
      width, height = img.size
  except Exception as e:  # PIL raises many types for bad files.
    raise DatasetError(f'{name}: unreadable image ({type(e).__name__}: {e})') from e
  return data, (height, width)


def read_mask(data: bytes, name: str) -> np.ndarray:
  """A PNG of class indices as an (H, W) uint8 array.

  Palette PNGs give their palette indices (never the colours); an RGB mask is accepted only when
  it is gray (R == G == B), because colour-coded masks need a user-defined colour -> class table.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as img:
      img.load()
      fmt, mode = img.format, img.mode
      arr = np.asarray(img)
  except Exception as e:
    raise DatasetError(f'{name}: unreadable mask ({type(e).__name__}: {e})') from e
  if fmt != 'PNG':
    raise DatasetError(f'{name}: mask is {fmt}, not PNG (lossy formats corrupt class indices)')
  if mode in ('RGB', 'RGBA'):
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
      raise DatasetError(f'{name}: colour ({mode}) mask; store class indices as a single-channel '
                         'or palette PNG')
    arr = arr[..., 0]
  elif mode == 'LA':
    arr = arr[..., 0]
  elif mode not in ('P', 'L', '1', 'I', 'I;16', 'I;16B', 'I;16L'):
    raise DatasetError(f'{name}: unsupported mask mode {mode!r}')
  if arr.ndim != 2:
    raise DatasetError(f'{name}: mask has shape {arr.shape}, expected (H, W)')
  if arr.dtype != np.uint8:
    if arr.size and int(arr.max()) > 255:
      raise DatasetError(f'{name}: mask values up to {int(arr.max())}, but labels must be < 256')
    arr = arr.astype(np.uint8)
  return arr


def bad_label_values(mask: np.ndarray, num_values: int, allow_ignore: bool = True) -> list[int]:
  """Values in `mask` outside [0, num_values) (other than 255 if `allow_ignore`)."""
  present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
  return [int(v) for v in present if v >= num_values and not (allow_ignore and v == IGNORE_LABEL)]


def check_mask(mask: np.ndarray, image_hw: tuple[int, int], num_values: int, name: str,
               allow_ignore: bool = True) -> None:
  """Raises DatasetError if `mask` does not fit its image or holds values outside the classes."""
  if mask.shape != tuple(image_hw):
    raise DatasetError(f'{name}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is '
                       f'{image_hw[0]}x{image_hw[1]} (HxW)')
  bad = bad_label_values(mask, num_values, allow_ignore)
  if bad:
    shown = ', '.join(map(str, bad[:10])) + (', ...' if len(bad) > 10 else '')
    allowed = f'[0, {num_values})' + (f' and {IGNORE_LABEL} (ignore)' if allow_ignore else '')
    raise DatasetError(f'{name}: label values {shown} outside {allowed}')


def encode_mask(mask: np.ndarray) -> bytes:
  """An (H, W) uint8 mask as single-channel PNG bytes (what TFDS stores for `segmentation_mask`).

  Palette PNGs are never stored as they are: TF decodes them to their colours, not the indices.
  """
  buf = io.BytesIO()
  PIL.Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode='L').save(buf, format='PNG')
  return buf.getvalue()


def segmentation_features() -> tfds.features.FeaturesDict:
  """`image`, `segmentation_mask` (H, W, 1) uint8 PNG and `file_name`: every builder here."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(),
      'segmentation_mask': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                               encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


def checked_example(image: bytes, mask: np.ndarray, file_name: str, image_name: str,
                    mask_name: str, num_values: int, allow_ignore: bool = True) -> dict:
  """A TFDS example from image bytes and a mask array, after every check (else DatasetError)."""
  image, hw = read_image(image, image_name)
  check_mask(mask, hw, num_values, mask_name, allow_ignore)
  return {'image': image, 'segmentation_mask': encode_mask(mask), 'file_name': file_name}


def require_archives(manual_dir: str | None, file_names: Sequence[str]) -> None:
  """Fails fast (before TFDS tries a download) when a given manual dir lacks an archive."""
  if manual_dir is None:
    return
  missing = [f for f in file_names if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise DatasetError(f'{", ".join(missing)}: not found in the manual dir {manual_dir}')


def archive_paths(dl_manager: tfds.download.DownloadManager,
                  archives: Mapping[str, tuple[str, str]]) -> dict[str, str]:
  """Each archive {key: (file name, url)} from the manual dir when it is there, else downloaded."""
  try:
    manual = os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # No manual dir given, or it is empty.
    manual = None
  found, to_download = {}, {}
  for key, (file_name, url) in archives.items():
    if manual and os.path.isfile(os.path.join(manual, file_name)):
      found[key] = os.path.join(manual, file_name)
    else:
      to_download[key] = url
  if to_download:
    try:
      found.update({k: os.fspath(p) for k, p in dl_manager.download(to_download).items()})
    except Exception as e:  # No internet, moved URL, ...: say what to put where instead.
      names = ', '.join(archives[k][0] for k in to_download)
      where = f'the manual dir {manual}' if manual else 'a manual dir (none given)'
      raise DatasetError(f'{names}: not in {where} and the download failed '
                         f'({type(e).__name__}: {e}); put the archive(s) there') from e
  return found


# TFDS 4.9.10 looks up a builder's `code_path` (for a checksums.tsv next to it) through the
# `importlib_resources` backport, which it imports unconditionally but declares only for
# Python < 3.9; without it every `download_and_prepare` fails. Our builders keep no checksums file,
# so each sets `code_path = None` (TFDS's own builders, e.g. `cityscapes`, need
# `pip install importlib_resources`).
NO_CODE_PATH = None


# ---------------------------------------------------------------------------------------------
# The folder dataset.

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
  code_path = NO_CODE_PATH

  def __init__(self, *, root: str, class_names: Sequence[str], **kwargs):
    self._root = os.fspath(root)
    self._class_names = tuple(class_names)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'Custom segmentation dataset from {self._root}.',
        features=segmentation_features(),
        supervised_keys=('image', 'segmentation_mask'),
        metadata=tfds.core.MetadataDict(deeplab_custom_segmentation=True,
                                        num_classes=len(self._class_names),
                                        class_names=list(self._class_names)),
    )

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
    raise ValueError(f'dataset name {name!r}: use lower_snake_case (a-z, 0-9, _)')
  try:
    get_spec(name)
    taken = True
  except ValueError:
    taken = name in tfds.list_builders(with_community_datasets=False)
  if taken:
    raise ValueError(f'dataset name {name!r} is already a TFDS or deeplab_jax dataset; pick '
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


def stored_spec(name: str, data_dir: str | None = None) -> DatasetSpec | None:
  """The spec of custom dataset `name` built in `data_dir`, from its stored metadata; None when
  there is no such custom dataset. `get_spec` falls back to this for names it does not know."""
  try:
    info = tfds.builder(name, data_dir=data_dir).info
    metadata = dict(info.metadata or {})
  except Exception:  # Not built there, or not a dataset at all.
    return None
  if not metadata.get('deeplab_custom_segmentation'):
    return None
  return DatasetSpec(name, int(metadata['num_classes']), tuple(metadata['class_names']))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m deeplab_jax.datasets.custom',
      description='Check or build a custom segmentation dataset folder (see module docstring).')
  sub = parser.add_subparsers(dest='command', required=True)
  check = sub.add_parser('check', help='report every bad image/mask without writing anything')
  bld = sub.add_parser('build', help='write the folder as a TFDS dataset')
  for p in (check, bld):
    p.add_argument('--root', required=True, help='folder with images/, masks/, splits/')
    p.add_argument('--num_classes', type=int, default=None,
                   help='number of classes (default: lines of ROOT/classes.txt)')
  bld.add_argument('--name', required=True, help='TFDS dataset name (lower_snake_case)')
  bld.add_argument('--data_dir', default=None, help='TFDS data_dir (default: TFDS default)')
  args = parser.parse_args(argv)

  if args.command == 'check':
    report = check_folder(args.root, args.num_classes)
    for p in report.problems:
      print(p)
    sizes = ', '.join(f'{k}: {len(v)}' for k, v in report.splits.items())
    print(f'{args.root}: {report.num_classes} classes; splits {sizes or "none"}; '
          f'{sum(p.fatal for p in report.problems)} errors, '
          f'{sum(not p.fatal for p in report.problems)} warnings.')
    absent = [f'{i} ({n})' for i, n in enumerate(report.class_names) if report.pixel_counts[i] == 0]
    if report.class_names and absent:
      print(f'classes with no pixels in any readable mask: {", ".join(absent)}')
    return 0 if report.ok else 1

  try:
    spec = build(args.name, args.root, args.data_dir, args.num_classes)
  except DatasetError as e:
    print(f'build failed, nothing written: {e}\n(run `check` for a report of every file)',
          file=sys.stderr)
    return 1
  print(f'built {spec.tfds_name} ({spec.num_classes} classes) in '
        f'{args.data_dir or "the TFDS default data_dir"}')
  return 0


if __name__ == '__main__':
  # Run the package's copy of this module, the one the other dataset modules import.
  from deeplab_jax.datasets import custom

  sys.exit(custom.main())
