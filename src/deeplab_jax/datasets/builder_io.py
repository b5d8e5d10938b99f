"""Reading and checking dataset files, shared by every builder of this package.

Every builder rejects bad input the same way: an image is fully decoded (a truncated or corrupt file
fails at build time, not in training), a mask must be a PNG of class indices that fits its image and
holds only values the dataset allows, and archives come from the manual dir or a download, with an
error that says what to put where.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from deeplab_jax.datasets.spec import IGNORE_LABEL
from deeplab_jax.errors import DatasetError

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


def segmentation_info(builder: tfds.core.GeneratorBasedBuilder, description: str,
                      homepage: str | None = None, **kwargs) -> tfds.core.DatasetInfo:
  """The `DatasetInfo` every builder here returns: `segmentation_features`, image -> mask."""
  return builder.dataset_info_from_configs(
      description=description, features=segmentation_features(),
      supervised_keys=('image', 'segmentation_mask'), homepage=homepage, **kwargs)


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


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> tfds.core.DatasetBuilder:
  """Build TFDS dataset `name` into `data_dir` from the archives in `manual_dir` (never from GCS)."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder
