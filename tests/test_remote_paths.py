"""Workdir / checkpoint / output paths that are URLs (`gs://bucket/dir`), without a network.

Multi-host pods share one gs:// workdir. `fake_gcs` routes epath's gs:// backend (tf.io.gfile, which
epath picks while TensorFlow is installed) to TensorFlow's in-memory `ram://` file system, so that
everything the library reads and writes through epath lands in memory. Orbax's own array I/O
(tensorstore) is not redirected: checkpoints are only listed here, not restored.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow as tf
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fakes import fake_example, random_variables, tiny_config
from PIL import Image

from deeplab_jax import checkpoint, evaluate, inference, metrics, paths, visualize


def _to_ram(path: os.PathLike | str) -> str:
  path = os.fspath(path)
  return 'ram://' + path[len('gs://'):] if path.startswith('gs://') else path


def _to_gs(path: os.PathLike | str) -> str:
  path = os.fspath(path)
  return 'gs://' + path[len('ram://'):] if path.startswith('ram://') else path


class _RamBackend(epath_backend._TfBackend):  # noqa: SLF001 (the backend epath uses for gs://)
  """epath's tf.io.gfile backend with gs://BUCKET/... stored at TF's in-memory ram://BUCKET/...."""

  def open(self, path, mode):
    path = _to_ram(path)
    if 'w' in mode and super().exists(path):  # ram:// appends on 'w'; GCS replaces the object.
      super().remove(path)
    return super().open(path, mode)

  def exists(self, path):
    return super().exists(_to_ram(path))

  def isdir(self, path):
    return super().isdir(_to_ram(path))

  def listdir(self, path):
    # ram:// lists by name prefix (`dir` also yields '.json' of a sibling `dir.json`); GCS does not.
    path = _to_ram(path).rstrip('/')
    return [name for name in super().listdir(path) if self.gfile.exists(f'{path}/{name}')]

  def glob(self, path):
    return [_to_gs(p) for p in super().glob(_to_ram(path))]

  def walk(self, top, **kwargs):
    for root, dirs, files in super().walk(_to_ram(top), **kwargs):
      yield _to_gs(root), dirs, files

  def makedirs(self, path, **kwargs):
    return super().makedirs(_to_ram(path), **kwargs)

  def mkdir(self, path, **kwargs):
    return super().mkdir(_to_ram(path), **kwargs)

  def rmtree(self, path):
    return super().rmtree(_to_ram(path))

  def remove(self, path):
    return super().remove(_to_ram(path))

  def rename(self, path, dst):
    return super().rename(_to_ram(path), _to_ram(dst))

  def replace(self, path, dst):
    return super().replace(_to_ram(path), _to_ram(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(_to_ram(path), _to_ram(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(_to_ram(path))


@pytest.fixture
def fake_gcs(monkeypatch) -> Iterator[str]:
  """A fresh `gs://<bucket>` held in memory; every gs:// path epath opens is redirected to it."""
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: True)
  monkeypatch.setattr(gpath, '_is_zonal_gcs_bucket', lambda bucket: False)
  monkeypatch.setattr(epath_backend, 'tf_backend', _RamBackend())
  bucket = f'gs://fake-{uuid.uuid4().hex[:12]}'
  yield bucket
  if tf.io.gfile.exists(_to_ram(bucket)):
    tf.io.gfile.rmtree(_to_ram(bucket))


def _ram_bytes(path: str) -> bytes:
  """What the fake bucket holds at gs:// `path`, read with plain tf.io.gfile (not epath)."""
  with tf.io.gfile.GFile(_to_ram(path), 'rb') as f:
    return f.read()


def _make_step(checkpoints: str, step: int, finished: bool = True) -> None:
  """A step directory as orbax leaves it on GCS: `commit_success.txt` once the save finished."""
  directory = f'{checkpoints}/{step}'
  tf.io.gfile.makedirs(_to_ram(directory))
  with tf.io.gfile.GFile(_to_ram(f'{directory}/_CHECKPOINT_METADATA'), 'w') as f:
    f.write('{}')
  if finished:
    with tf.io.gfile.GFile(_to_ram(f'{directory}/commit_success.txt'), 'w') as f:
      f.write('ok')


def test_paths_keep_urls_and_make_local_paths_absolute():
  assert paths.absolute('gs://b/w') == 'gs://b/w'
  assert paths.absolute('gs://b/w//') == 'gs://b/w'
  assert paths.absolute('s3://b/x/y') == 's3://b/x/y'
  assert paths.absolute('relative/dir') == os.path.abspath('relative/dir')
  assert paths.join('gs://b/w', 'eval', 'val_3.json') == 'gs://b/w/eval/val_3.json'
  assert paths.basename('gs://b/w/checkpoints/12') == '12'
  assert paths.dirname('gs://b/w/checkpoints/12') == 'gs://b/w/checkpoints'
  assert paths.is_url('gs://b') and not paths.is_url('/tmp/gs:/b') and not paths.is_url('w')


def test_checkpoint_paths_are_never_mangled(fake_gcs):
  workdir = f'{fake_gcs}/w'
  assert checkpoint.checkpoint_dir(workdir) == f'{workdir}/checkpoints'
  assert checkpoint.checkpoint_dir(workdir + '/') == f'{workdir}/checkpoints'
  assert checkpoint.available_steps(workdir) == [] and checkpoint.latest_step(workdir) is None
  with pytest.raises(checkpoint.CheckpointError, match=f"looked for step directories in "
                     f"'{workdir}/checkpoints'"):
    checkpoint.restore_variables(workdir)
  _make_step(f'{workdir}/checkpoints', 4)
  assert checkpoint.checkpoint_dir(workdir) == f'{workdir}/checkpoints'
  assert checkpoint.checkpoint_dir(f'{workdir}/checkpoints') == f'{workdir}/checkpoints'
  assert checkpoint._resolve(f'{workdir}/checkpoints/4', None) == (f'{workdir}/checkpoints', 4)
  assert checkpoint._resolve(workdir, 4) == (f'{workdir}/checkpoints', 4)


def test_checkpoint_steps_listed_through_url(fake_gcs):
  checkpoints = f'{fake_gcs}/w/checkpoints'
  for step in (1, 30, 200):
    _make_step(checkpoints, step)
  _make_step(checkpoints, 250, finished=False)  # A save cut short: no commit_success.txt.
  tf.io.gfile.makedirs(_to_ram(f'{checkpoints}/not_a_step'))
  assert checkpoint.available_steps(f'{fake_gcs}/w') == [1, 30, 200]
  assert checkpoint.available_steps(checkpoints) == [1, 30, 200]
  assert checkpoint.latest_step(f'{fake_gcs}/w') == 200
  assert checkpoint.is_step_dir(f'{checkpoints}/30')
  assert not checkpoint.is_step_dir(f'{checkpoints}/250')


def test_metrics_jsonl_through_url(fake_gcs):
  workdir = f'{fake_gcs}/runs/w'
  path = paths.join(workdir, metrics.METRICS_FILE)
  writer = metrics.JsonlWriter(path)
  writer.write_scalars(1, {'train/loss': np.float32(2.5)})
  # Each record is stored when write_scalars returns: nothing waits for flush() or close().
  assert _ram_bytes(path) == b'{"step": 1, "train/loss": 2.5}\n'
  other = metrics.JsonlWriter(path)  # E.g. a separate eval job writing to the same workdir.
  other.write_scalars(2, {'eval/miou': 0.5})
  writer.write_scalars(3, {'train/loss': 1.0})
  writer.flush()
  writer.close()
  other.close()
  assert metrics.read_metrics(workdir) == [
      {'step': 1, 'train/loss': 2.5}, {'step': 2, 'eval/miou': 0.5}, {'step': 3, 'train/loss': 1.0}]
  with pytest.raises(ValueError, match='closed'):
    writer.write_scalars(4, {'train/loss': 0.0})


def test_metrics_jsonl_local_still_appends(tmp_path):
  path = tmp_path / 'w' / metrics.METRICS_FILE
  path.parent.mkdir()
  path.write_text('{"step": 0, "x": 1.0}\n')
  writer = metrics.JsonlWriter(path)
  writer.write_scalars(1, {'x': 2.0})
  assert path.read_text() == '{"step": 0, "x": 1.0}\n{"step": 1, "x": 2.0}\n'
  writer.close()


def test_eval_results_and_images_through_url(fake_gcs, tmp_path):
  workdir = f'{fake_gcs}/w'
  result = {'step': 7, 'miou': 0.25, 'per_class_iou': {'a': 0.5, 'b': None}}
  path = evaluate.write_results(workdir, 'val/x', 7, result)
  assert path == f'{workdir}/eval/val_x_7.json'
  assert json.loads(_ram_bytes(path)) == result
  rng = np.random.default_rng(0)
  images = {'eval/input': rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8),
            'eval/prediction': visualize.colorize(rng.integers(0, 3, (2, 5, 6)))}
  directory = visualize.write_images(workdir, 'val/x', 7, images)
  assert directory == f'{workdir}/eval/val_x_7'
  local = visualize.write_images(tmp_path, 'val/x', 7, images)
  names = sorted(p.name for p in paths.to_epath(directory).iterdir())
  assert names == ['0_input.png', '0_prediction.png', '1_input.png', '1_prediction.png']
  for name in names:
    data = _ram_bytes(f'{directory}/{name}')
    assert data == (tmp_path / local / name).read_bytes()  # The same bytes as a local write.
  with Image.open(io.BytesIO(_ram_bytes(f'{directory}/1_input.png'))) as im:
    np.testing.assert_array_equal(np.asarray(im), images['eval/input'][1])


def test_list_images_through_url(fake_gcs):
  directory = f'{fake_gcs}/images'
  tf.io.gfile.makedirs(_to_ram(directory))
  for name in ('b.png', 'a.JPG', 'notes.txt'):
    with tf.io.gfile.GFile(_to_ram(f'{directory}/{name}'), 'wb') as f:
      f.write(b'x')
  assert inference.list_images(directory) == [f'{directory}/a.JPG', f'{directory}/b.png']
  assert inference.list_images(f'{directory}/b.png') == [f'{directory}/b.png']
  with pytest.raises(FileNotFoundError, match='neither an image file nor a directory'):
    inference.list_images(f'{directory}/missing.png')


def test_predict_reads_and_writes_urls(fake_gcs, tmp_path):
  config = tiny_config()
  checkpoint.save_variables(tmp_path / 'wd', random_variables(config), step=3)  # Local: orbax.
  image, _ = fake_example(5, 1, (20, 27))
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, format='PNG')
  tf.io.gfile.makedirs(_to_ram(f'{fake_gcs}/in'))
  with tf.io.gfile.GFile(_to_ram(f'{fake_gcs}/in/im.png'), 'wb') as f:
    f.write(buffer.getvalue())
  out = f'{fake_gcs}/out'
  written = inference.predict_images(config, tmp_path / 'wd', f'{fake_gcs}/in', out,
                                   save_logits=True)
  assert written == [f'{out}/im.png', f'{out}/im_overlay.png', f'{out}/im_logits.npy']
  logits = np.load(io.BytesIO(_ram_bytes(f'{out}/im_logits.npy')))
  assert logits.shape == (20, 27, config.model.num_classes) and logits.dtype == np.float32
  with Image.open(io.BytesIO(_ram_bytes(f'{out}/im.png'))) as label_png:
    assert label_png.mode == 'P' and label_png.size == (27, 20)
    np.testing.assert_array_equal(np.asarray(label_png), logits.argmax(-1))
