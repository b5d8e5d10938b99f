"""Paths that may be URLs: a local directory or cloud storage such as `gs://bucket/dir`.

Multi-host pods share one workdir on GCS, so every workdir, checkpoint and output path may be a URL.
URLs are kept as they are (`os.path.abspath('gs://b/w')` would give '/cwd/gs:/b/w') and are read and
written through `etils.epath` (tf.io.gfile, or fsspec, underneath); local paths are made absolute
and behave exactly as with `os` and the builtin `open` (epath's local backend is `os` itself).
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import IO

from etils import epath

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`scheme://...`) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a URL as it is, less trailing slashes (so `basename` works)."""
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = path.split('://', 1)
    return f'{scheme}://{rest.rstrip("/")}'
  return os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  """`os.path.join`, with '/' for URLs on any OS."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def basename(path: str | os.PathLike) -> str:
  """`os.path.basename`, with '/' for URLs on any OS."""
  path = os.fspath(path)
  return posixpath.basename(path) if is_url(path) else os.path.basename(path)


def dirname(path: str | os.PathLike) -> str:
  """`os.path.dirname`, with '/' for URLs on any OS."""
  path = os.fspath(path)
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def to_epath(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a local path, or gs:// / s3:// / ... through their backend."""
  return epath.Path(os.fspath(path))


def makedirs(path: str | os.PathLike) -> None:
  """`os.makedirs(path, exist_ok=True)` for local paths and URLs."""
  to_epath(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = 'r') -> IO:
  """The builtin `open` for local paths and URLs alike."""
  return to_epath(path).open(mode)
