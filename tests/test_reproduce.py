"""The reproduce command: evaluate a checkpoint, pass within the tolerance of the expected mIoU,
fail with a table (status 1) outside it."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from fakes import random_variables

from deeplab_jax import checkpoint, reproduce
from deeplab_jax import config as config_lib
from deeplab_jax.errors import ConfigError
from deeplab_jax.tools import app
from deeplab_jax.tools import reproduce as reproduce_tool

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configs_carry_the_published_figures():
  expected = {'voc_xception': 0.8220, 'voc_resnet101': 0.7885, 'cityscapes_xception': 0.7879,
              'shapes': 0.915, 'ade20k_xception': None}
  for name, miou in expected.items():
    module = _load(name)
    assert module.get_config().eval.expected_miou == miou, name
    if miou is not None:
      assert f'{miou:.4f}'.rstrip('0') in module.__doc__ or f'{miou * 100:.2f}%' in module.__doc__
  shapes = _load('shapes').get_config()
  assert len(shapes.eval.expected_per_class_iou) == shapes.model.num_classes


def test_reproduce_passes_near_the_expected_miou_and_fails_with_a_table(tmp_path, capsys):
  """On the embedded dataset (its tiny variant, built here): a checkpoint written by the test is
  checked against its own measured mIoU (passes) and against the main job's 0.915 (fails)."""
  config = config_lib.tiny_config(str(tmp_path / 'tfds'))
  config.eval.trimap_widths = ()
  config.eval.plots = False
  workdir = tmp_path / 'wd'
  checkpoint.save_variables(workdir, random_variables(config), step=5)
  with pytest.raises(ConfigError, match='No expected mIoU: pass --expect'):
    reproduce.reproduce(config, workdir)
  measured = reproduce.reproduce(config, workdir, expected_miou=0.5, tolerance=1.0).result['miou']
  argv = [f'--config={CONFIGS / "tiny.py"}', f'--workdir={workdir}',
          f'--config.data.data_dir={tmp_path / "tfds"}', '--config.eval.trimap_widths=()',
          '--config.eval.plots=False']
  assert app.call(reproduce_tool, [*argv, f'--expect={measured + 0.004:.6f}']) == 0
  assert 'PASS: mIoU' in capsys.readouterr().out
  far = _load('shapes').get_config().eval.expected_miou
  assert abs(measured - far) > 0.1  # A random tiny model is far from the embedded model's figure.
  assert app.call(reproduce_tool, [*argv, f'--expect={far}', '--tolerance=0.02']) == 1
  table = capsys.readouterr().out
  assert f'{measured:.4f}' in table and '0.9150' in table and 'FAIL: mIoU' in table
  assert 'OUTSIDE 0.0200 of the reference 0.9150' in table
  for name in ('background', 'disk', 'cross'):
    assert name in table
  # Per-class references, where the config has them, are shown beside ours.
  config.eval.expected_miou = far
  config.eval.expected_per_class_iou = (0.98, 0.96, 0.94, 0.92, 0.85, 0.85)
  comparison = reproduce.reproduce(config, workdir)
  assert not comparison.ok and '0.9800' in comparison.table and '0.8500' in comparison.table
