"""Config validation: every bad field gets one clear error naming the field and the fix, before any
compile; crop sizes off the `output_stride * k + 1` grid only warn."""

from __future__ import annotations

import importlib.util
import logging
import pathlib

import numpy as np
import pytest
from fakes import fake_train_iterator, random_variables, tiny_config

from deeplab_jax import checkpoint, train
from deeplab_jax import config as config_lib
from deeplab_jax.validate import ConfigError, validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def base_config():
  """The official VOC recipe: valid as it is on 4 devices."""
  return config_lib.get_base_config()


def check(config, mode='train_and_eval', devices=4, processes=1):
  validate_config(config, device_count=devices, process_count=processes, mode=mode)


def test_the_base_config_is_valid_without_warnings(caplog):
  with caplog.at_level(logging.WARNING):
    for mode in ('train_and_eval', 'train', 'eval', 'predict'):
      check(base_config(), mode)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert issubclass(ConfigError, ValueError)


def _set(config, field, value):
  *parents, name = field.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[name] = value
  return config


@pytest.mark.parametrize('field, value, expected', [
  ('model.backbone', 'xception_66', r"config.model.backbone='xception_66' is unknown; set it to "
   r"one of \('xception_41'"),
  ('model.output_stride', 12, r'config.model.output_stride=12 is not supported; set it to one of '
   r'\(8, 16, 32\)'),
  ('eval.output_stride', 4, r'config.eval.output_stride=4 is not supported'),
  ('model.atrous_rates', (6, 0, 18), r'config.model.atrous_rates=\(6, 0, 18\) must be positive '
   r'integers'),
  ('model.atrous_rates', (6, -12, 18), r'config.model.atrous_rates=\(6, -12, 18\) must be positive'),
  ('model.atrous_rates', (6, 12, 40), r'ASPP rates \(6, 12, 40\) at output stride 16 do not fit '
   r'config.train.crop_size=\(513, 513\): its feature map is 33 pixels wide.*rate\(s\) \[40\].*'
   r'Fix: set config.model.atrous_rates to rates below 33'),
  ('model.num_classes', 20, r"config.model.num_classes=20 but dataset 'voc2012_segmentation' has "
   r'21 classes; set config.model.num_classes=21'),
  ('data.dataset', 'no_such_dataset', r"config.data.dataset='no_such_dataset' is not a dataset "
   'deeplab_jax knows'),
  ('train.batch_size', 10, r'config.train.batch_size=10 is the global batch over all 4 devices '
   r'\(1 process\(es\)\) and must be a positive multiple of 4; set it to e.g. 8'),
  ('train.batch_size', 0, r'config.train.batch_size=0 .* set it to e.g. 4'),
  ('eval.batch_size', 6, r'config.eval.batch_size=6 is the global batch.*multiple of 4'),
  ('eval.scales', (0.5, 0.0, 1.0), r'config.eval.scales=\(0.5, 0.0, 1.0\) must be one or more '
   'positive factors'),
  ('eval.scales', (), r'config.eval.scales=\(\) must be one or more positive'),
  ('train.crop_size', (513,), r'config.train.crop_size=\(513,\) must be \(height, width\)'),
  ('eval.crop_size', (0, 513), r'config.eval.crop_size=\(0, 513\) must be \(height, width\)'),
  ('train.num_steps', 0, r'config.train.num_steps=0 must be a positive integer'),
  ('train.log_every', 0, r'config.train.log_every=0 must be a positive integer'),
  ('train.checkpoint_every', -5, r'config.train.checkpoint_every=-5 must be a positive integer'),
  ('eval.every', 0, r'config.eval.every=0 must be a positive integer'),
  ('eval.mode', 'tiles', r"config.eval.mode='tiles'; use 'whole'.* or 'slide'"),
  ('eval.stride', (600, 300), r'config.eval.stride=\(600, 300\) must be .* no larger than the '
   r'window config.eval.crop_size=\(513, 513\)'),
  ('eval.stride', (0, 300), r'config.eval.stride=\(0, 300\) must be'),
  ('eval.trimap_widths', (1, -2), r'config.eval.trimap_widths=\(1, -2\) must be band widths'),
  ('eval.expected_miou', 82.2, r'config.eval.expected_miou=82.2 must be an mIoU in \[0, 1\]'),
  ('train.class_weights', (1.0, 2.0), r'config.train.class_weights has 2 entries for '
   r'config.model.num_classes=21'),
  ('train.top_k_percent_pixels', 0.0, r'config.train.top_k_percent_pixels=0.0 must be in \(0, 1\]'),
])
def test_each_bad_field_gets_one_clear_error(field, value, expected):
  with pytest.raises(ConfigError, match=expected):
    check(_set(base_config(), field, value))


def test_no_atrous_rates_mean_no_atrous_branches():
  config = base_config()
  config.model.atrous_rates = ()  # The MobileNetV2 model-zoo head: image pooling and 1x1 only.
  for mode in ('train_and_eval', 'eval', 'predict'):
    check(config, mode)
  assert config_lib.apply_smoke(config).model.atrous_rates == ()


def test_rates_scaled_to_the_eval_output_stride_must_stay_positive():
  config = base_config()
  config.model.atrous_rates = (1, 2, 3)
  config.model.output_stride = 8
  config.eval.output_stride = 32
  with pytest.raises(ConfigError, match=r'config.model.atrous_rates=\(1, 2, 3\) at '
                     r'config.model.output_stride=8 become \(0, 0, 1\) at '
                     r'config.eval.output_stride=32; every rate must stay >= 1'):
    check(config, 'eval')


def test_explicit_rates_must_fit_the_eval_crop_at_the_eval_output_stride():
  config = base_config()
  config.model.atrous_rates = (6, 12, 18)
  config.eval.output_stride = 32  # Rates (3, 6, 9) on a 17-pixel feature map: fine.
  check(config, 'eval')
  config.eval.output_stride = 16
  config.eval.crop_size = (161, 161)  # 11 pixels at OS 16: 12 and 18 only read padding.
  with pytest.raises(ConfigError, match=r'do not fit config.eval.crop_size=\(161, 161\): its '
                     r'feature map is 11 pixels wide.*\[12, 18\]'):
    check(config, 'eval')
  check(config, 'predict')  # Prediction pads each image to its own size: no crop to fit.


def test_default_rates_that_do_not_fit_a_small_crop_only_warn(caplog):
  config = base_config()
  config.train.crop_size = (65, 65)
  config.eval.crop_size = (65, 65)
  with caplog.at_level(logging.WARNING):
    check(config)
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('ASPP rates (6, 12, 18) at output stride 16 do not fit config.train.crop_size=(65, 65)'
             in m and 'Set config.model.atrous_rates (below 5)' in m for m in messages), messages


def test_crop_sizes_off_the_output_stride_grid_warn(caplog):
  config = base_config()
  config.train.crop_size = (512, 513)
  config.eval.crop_size = (513, 520)
  with caplog.at_level(logging.WARNING):
    check(config)
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('config.train.crop_size=(512, 513) is not of the form output_stride * k + 1' in m
             and '(513, 513) fits' in m for m in messages), messages
  assert any('config.eval.crop_size=(513, 520)' in m and '(513, 529) fits' in m
             for m in messages), messages


def test_batch_must_split_over_processes_too():
  config = base_config()
  config.train.batch_size = 6
  check(config, 'train', devices=2, processes=2)
  config.train.batch_size = 9
  with pytest.raises(ConfigError, match=r'over all 3 devices \(2 process\(es\)\) and must be a '
                     r'positive multiple of 6; set it to e.g. 6'):
    check(config, 'train', devices=3, processes=2)


def test_modes_check_only_what_they_use():
  config = base_config()
  config.train.batch_size = 3
  config.eval.batch_size = 3
  check(config, 'predict')
  with pytest.raises(ConfigError, match='config.eval.batch_size'):
    check(config, 'eval')
  with pytest.raises(ConfigError, match='config.train.batch_size'):
    check(config, 'train')
  config.eval.every = 0  # Only train_and_eval evaluates periodically.
  config.train.batch_size = 4
  check(config, 'train')
  with pytest.raises(ValueError, match='mode='):
    check(config, 'serve')


def test_init_from_must_hold_a_checkpoint(tmp_path):
  config = base_config()
  config.init_from = str(tmp_path / 'nothing_here')
  with pytest.raises(ConfigError, match=r"config.init_from='.*nothing_here' holds no checkpoint.*"
                     'or set it to None'):
    check(config)
  check(config, 'eval')  # Evaluation reads the workdir's own checkpoint, not init_from.
  variables = {'params': {'w': np.zeros((2, 2), np.float32)}, 'batch_stats': {}}
  step_dir = checkpoint.save_variables(tmp_path / 'converted', variables, step=7)
  for source in (tmp_path / 'converted', tmp_path / 'converted' / 'checkpoints', step_dir):
    config.init_from = str(source)
    check(config)
  # An unfinished orbax write (temporary directory name) is not a checkpoint.
  partial = tmp_path / 'partial' / 'checkpoints' / '5.orbax-checkpoint-tmp-123'
  partial.mkdir(parents=True)
  config.init_from = str(tmp_path / 'partial')
  with pytest.raises(ConfigError, match='holds no checkpoint'):
    check(config)


@pytest.mark.parametrize('name', sorted(p.name for p in CONFIGS.glob('*.py')))
def test_shipped_configs_are_valid(name):
  spec = importlib.util.spec_from_file_location(name[:-3], CONFIGS / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  check(config, devices=1)
  check(config_lib.apply_smoke(config), devices=1)


def test_training_validates_before_compiling(tmp_path):
  config = tiny_config()
  config.model.output_stride = 12
  with pytest.raises(ConfigError, match='config.model.output_stride=12'):
    train.train_and_evaluate(config, tmp_path / 'wd', create_train_iterator=fake_train_iterator)
  assert not (tmp_path / 'wd').exists()  # Failed before touching the workdir.


def test_a_checkpoint_of_another_model_names_its_source_and_the_fix(tmp_path):
  """Found on restore (the shapes come from the checkpoint's metadata), before the step compiles."""
  config = tiny_config()
  other = tiny_config()
  other.model.aspp_channels = 32
  checkpoint.save_variables(tmp_path / 'other', random_variables(other), step=1)
  config.init_from = str(tmp_path / 'other')
  with pytest.raises(checkpoint.CheckpointError, match=(
      r"^config.init_from='.*other': Checkpoint .*other/checkpoints/1 does not fit the model: "
      r'params/aspp0/\S+ has shape .* Fix: make config.model match the checkpoint .* Or point '
      r'config.init_from at a checkpoint of this model')):
    train.train_and_evaluate(config, tmp_path / 'wd', run_eval=False,
                             create_train_iterator=fake_train_iterator)
  # A workdir with a training checkpoint of another model: the rerun names the workdir.
  config.init_from = None
  manager = checkpoint.create_manager(tmp_path / 'old_run')
  try:
    checkpoint.save_tree(manager, 3, {**random_variables(other), 'step': np.int32(3),
                                      'opt_state': {'mu': np.zeros(3, np.float32)},
                                      'rng': np.zeros(2, np.uint32)})
    manager.wait_until_finished()
  finally:
    manager.close()
  with pytest.raises(checkpoint.CheckpointError, match=(
      r'^--workdir=.*old_run: Checkpoint .*old_run/checkpoints/3 does not fit the model: '
      r'params/aspp0/\S+ has shape .* Or start this model in a new --workdir\.$')):
    train.train_and_evaluate(config, tmp_path / 'old_run', run_eval=False,
                             create_train_iterator=fake_train_iterator)
