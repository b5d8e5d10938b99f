"""`launch/colab_tpu.ipynb` runs top to bottom (smoke mode, CPU) in a kernel of this interpreter."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'launch' / 'colab_tpu.ipynb'
KERNEL_NAME = 'deeplab-jax-test'


def _kernel_spec(root: pathlib.Path) -> pathlib.Path:
  """A kernel spec for *this* interpreter under `root/kernels/`, whatever else is installed."""
  spec_dir = root / 'kernels' / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
    'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
    'display_name': 'deeplab_jax test', 'language': 'python'}))
  return root


def _text(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream':
      parts.append(output.get('text', ''))
    elif 'data' in output:
      parts.append(output['data'].get('text/plain', ''))
  return ''.join(parts)


def test_colab_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  monkeypatch.setenv('JUPYTER_PATH', str(_kernel_spec(tmp_path / 'jupyter')))
  monkeypatch.setenv('DEEPLAB_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('DEEPLAB_NOTEBOOK_DIR', str(tmp_path / 'notebook'))
  monkeypatch.delenv('DEEPLAB_VOC_DATA_DIR', raising=False)
  monkeypatch.delenv('DEEPLAB_VOC_WORKDIR', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=600,
                                   resources={'metadata': {'path': str(REPO)}})
  start = time.monotonic()
  client.execute()
  seconds = time.monotonic() - start
  nbformat.write(nb, tmp_path / 'executed.ipynb')  # To look at when an assertion below fails.
  code = [c for c in nb.cells if c.cell_type == 'code']
  texts = [_text(c) for c in code]
  everything = '\n'.join(texts)
  assert 'SMOKE=True' in texts[0]
  assert 'Skipping installation' in everything  # CI has the package installed already.
  assert 'Trained to step 3' in everything
  assert 'Restored step 3' in everything and 'mIoU ' in everything
  images = [o for c in code for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert images, 'the predictions cell showed no image'
  assert 'VOC: skipped' in texts[-1]
  workdir = tmp_path / 'notebook' / 'workdir_shapes_smoke'
  assert (workdir / 'checkpoints' / '3').is_dir()
  print(f'notebook executed in {seconds:.0f} s')
