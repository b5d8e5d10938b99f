"""Official TF1 checkpoints -> deeplab_jax: every variable lands in its parameter, strictly.

The checkpoints are written with a graph-mode `tf.compat.v1.train.Saver` under the official names and
shapes of `tests/data/reference/*.tsv` (full size, random values), plus the training-only variables real
model-zoo checkpoints carry. Strictness is tested on in-memory sources with the same names (the
conversion core is the same; nothing is written).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util
from reference_data import RESNET_TSV, XCEPTION_TSV, reference_shapes

from deeplab_jax import checkpoint, convert
from deeplab_jax import config as config_lib
from deeplab_jax.tools import app
from deeplab_jax.tools import convert as convert_tool

SLOTS = ('xception_65/entry_flow/conv1_1/weights', 'aspp0/weights', 'logits/semantic/biases',
         'resnet_v1_101/conv1_1/weights')


def random_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def write_tf1_checkpoint(prefix: str, values: dict[str, np.ndarray], global_step: int = 30000
                         ) -> None:
  """A TF1 checkpoint as `tf.compat.v1.train.Saver` writes it in graph mode."""
  import tensorflow as tf

  with tf.Graph().as_default():
    feeds, var_list = {}, {}
    for name, value in values.items():
      placeholder = tf.compat.v1.placeholder(tf.float32, value.shape)
      var_list[name] = tf.compat.v1.Variable(placeholder, name=name, use_resource=False)
      feeds[placeholder] = value
    step = tf.compat.v1.train.get_or_create_global_step()
    var_list['global_step'] = step
    saver = tf.compat.v1.train.Saver(var_list=var_list)
    with tf.compat.v1.Session() as sess:
      sess.run([v.initializer for v in var_list.values()], feed_dict=feeds)
      sess.run(step.assign(global_step))
      saver.save(sess, prefix, write_meta_graph=False)


def with_training_variables(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`values` plus momentum slots and a moving-average shadow, as training leaves them."""
  out = dict(values)
  for name in SLOTS:
    if name in values:
      out[f'{name}/Momentum'] = np.full_like(values[name], 7.0)
      out[f'{name}/ExponentialMovingAverage'] = np.full_like(values[name], 9.0)
  return out


def model_config(backbone: str = 'xception_65', **overrides):
  config = config_lib.get_base_config()
  config.model.backbone = backbone
  for key, value in overrides.items():
    config.model[key] = value
  return config.model


def flat_variables(variables: dict) -> dict[str, np.ndarray]:
  flat = {}
  for collection in checkpoint.VARIABLE_COLLECTIONS:
    flat.update(traverse_util.flatten_dict(variables[collection], sep='/'))
  return flat


def memory_source(shapes: dict[str, tuple[int, ...]]) -> convert.Source:
  """A source with `shapes` whose values are never read (the conversion fails or is checked first)."""
  return convert.Source('in-memory', dict(shapes), lambda name: np.zeros(shapes[name], np.float32))


@pytest.fixture(scope='module')
def xception_checkpoint(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
  values = random_values(reference_shapes(XCEPTION_TSV), seed=0)
  prefix = str(tmp_path_factory.mktemp('xception65') / 'model.ckpt')
  write_tf1_checkpoint(prefix, with_training_variables(values))
  return prefix, values


@pytest.fixture(scope='module')
def resnet_checkpoint(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
  values = random_values(reference_shapes(RESNET_TSV), seed=1)
  prefix = str(tmp_path_factory.mktemp('resnet101beta') / 'model.ckpt')
  write_tf1_checkpoint(prefix, with_training_variables(values))
  return prefix, values


def check_every_variable(variables: dict, values: dict[str, np.ndarray], report) -> None:
  """Every checkpoint value sits, bit for bit and in the same layout, in its parameter."""
  flat = flat_variables(variables)
  assert set(flat) == set(values)
  for name, value in values.items():
    collection = 'batch_stats' if name.endswith(('moving_mean', 'moving_variance')) else 'params'
    assert name in traverse_util.flatten_dict(variables[collection], sep='/'), name
    assert flat[name].shape == value.shape, name
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  assert report.initialised == [] and not report.backbone_only
  assert report.skipped_by_rule['global_step'] == 'training step counter'
  slots = [n for n in report.skipped_by_rule if n.endswith('/Momentum')]
  shadows = [n for n in report.skipped_by_rule if n.endswith('/ExponentialMovingAverage')]
  assert len(slots) == len(shadows) == len([s for s in SLOTS if s in values])


def test_xception65_checkpoint_every_variable_in_place(xception_checkpoint):
  prefix, values = xception_checkpoint
  variables, report = convert.convert_tf(prefix, model_config('xception_65'))
  check_every_variable(variables, values, report)
  # Spot-check the layouts the names imply: HWIO kernels, (k, k, C, 1) depthwise kernels.
  p = variables['params']
  assert p['xception_65']['entry_flow']['conv1_1']['weights'].shape == (3, 3, 3, 32)
  assert p['aspp1_depthwise']['depthwise_weights'].shape == (3, 3, 2048, 1)
  assert p['logits']['semantic']['weights'].shape == (1, 1, 256, 21)


def test_resnet101_beta_checkpoint_every_variable_in_place(resnet_checkpoint):
  prefix, values = resnet_checkpoint
  variables, report = convert.convert_tf(prefix, model_config('resnet_v1_101_beta'))
  check_every_variable(variables, values, report)
  stats = variables['batch_stats']['resnet_v1_101']['block4']['unit_3']['bottleneck_v1']
  np.testing.assert_array_equal(
      stats['conv3']['BatchNorm']['moving_variance'],
      values['resnet_v1_101/block4/unit_3/bottleneck_v1/conv3/BatchNorm/moving_variance'])


def run_cli(argv: list[str]) -> convert.Report:
  """The command line in-process, on private flags (no second TF/JAX start-up)."""
  return app.call(convert_tool, argv)


def test_cli_writes_a_workdir_that_restores(xception_checkpoint, tmp_path, capsys):
  """`convert tf` writes a workdir that `restore_variables` (eval, predict, init_from) reads."""
  prefix, values = xception_checkpoint
  out = tmp_path / 'converted'
  run_cli(['tf', f'--checkpoint={os.path.dirname(prefix)}', f'--output={out}'])
  printed = capsys.readouterr().out
  assert f'{len(values)} variables filled' in printed
  assert '3 optimizer slot' in printed and '1 training step counter' in printed
  report = json.loads((out / 'conversion.json').read_text())
  assert report['initialised'] == [] and 'global_step' in report['skipped_by_rule']
  restored, step = checkpoint.restore_variables(str(out))
  assert step == 0
  flat = flat_variables(restored)
  assert set(flat) == set(values)
  for name in ('xception_65/middle_flow/block1/unit_16/xception_module/separable_conv3_depthwise/'
               'depthwise_weights', 'decoder/decoder_conv1_pointwise/BatchNorm/moving_mean',
               'logits/semantic/weights'):
    np.testing.assert_array_equal(flat[name], values[name])


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_cli_errors_exit_with_the_message(xception_checkpoint, tmp_path):
  prefix, _ = xception_checkpoint
  config_file = tmp_path / 'config.py'
  config_file.write_text('from deeplab_jax.config import get_base_config\n\n\n'
                         'def get_config():\n  return get_base_config()\n')
  with pytest.raises(app.UsageError, match='tf or timm'):
    run_cli(['onnx', f'--output={tmp_path}'])
  with pytest.raises(convert.ConversionError, match=re.escape('--config.model.num_classes=21')):
    run_cli(['tf', f'--checkpoint={prefix}', f'--output={tmp_path / "out"}',
             f'--config={config_file}', '--config.model.num_classes=19'])
  assert not (tmp_path / 'out').exists()
  # As a command (the older module name, kept for existing commands), the error is one line on
  # stderr and exit status 1.
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.convert', 'tf', f'--checkpoint={prefix}',
       f'--output={tmp_path / "out"}', f'--config={config_file}', '--config.model.num_classes=19'],
      capture_output=True, text=True)
  assert result.returncode == 1
  assert 'error: Cannot convert' in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'out').exists()


def test_unknown_checkpoint_variable_fails_and_is_listed():
  shapes = dict(reference_shapes(XCEPTION_TSV))
  shapes['aspp4/weights'] = (1, 1, 2048, 256)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(memory_source(shapes), model_config('xception_65'), initialise=False)
  message = str(error.value)
  assert '1 checkpoint variables are not used by the model' in message
  assert 'aspp4/weights (1, 1, 2048, 256)' in message
  assert 'not in the checkpoint' not in message
  # Told to skip it, the conversion goes through.
  variables, report = convert.convert(memory_source(shapes), model_config('xception_65'),
                                      skip=[r'^aspp4/'], initialise=False)
  assert report.skipped_by_user == ['aspp4/weights'] and report.initialised == []


def test_missing_model_variables_fail_and_are_listed():
  shapes = dict(reference_shapes(XCEPTION_TSV))
  removed = [n for n in shapes if n.startswith('decoder/decoder_conv1_pointwise/')]
  for name in removed:
    del shapes[name]
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(memory_source(shapes), model_config('xception_65'), initialise=False)
  message = str(error.value)
  assert f'{len(removed)} model variables are not in the checkpoint' in message
  assert 'decoder/decoder_conv1_pointwise/weights (1, 1, 256, 256)' in message
  assert 'decoder/decoder_conv1_pointwise/BatchNorm/moving_variance (256,)' in message


def test_num_classes_mismatch_names_shapes_and_fix():
  shapes = reference_shapes(XCEPTION_TSV)
  config = model_config('xception_65', num_classes=19)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(memory_source(shapes), config, initialise=False)
  message = str(error.value)
  assert 'logits/semantic/weights: checkpoint (1, 1, 256, 21) vs model (1, 1, 256, 19)' in message
  assert 'logits/semantic/biases: checkpoint (21,) vs model (19,)' in message
  assert '--config.model.num_classes=21' in message and "--skip='^logits/'" in message
  # Skipping the logits keeps everything else and initialises the 19-class logits.
  variables, report = convert.convert(memory_source(shapes), config, skip=['^logits/'], seed=3)
  assert report.initialised == ['logits/semantic/biases', 'logits/semantic/weights']
  assert report.skipped_by_user == ['logits/semantic/biases', 'logits/semantic/weights']
  logits = variables['params']['logits']['semantic']
  assert logits['weights'].shape == (1, 1, 256, 19) and logits['biases'].shape == (19,)
  assert np.all(logits['biases'] == 0) and 0 < np.std(logits['weights']) < 0.02  # N(0, 0.01).


def test_ade20k_logits_drop_the_ignored_class():
  """As the official ADE20K checkpoint (151 logits, class 0 'other' ignored -> our 150 classes),
  with 22 -> 21 classes to reuse the default model."""
  shapes = dict(reference_shapes(XCEPTION_TSV))
  shapes['logits/semantic/weights'] = (1, 1, 256, 22)
  shapes['logits/semantic/biases'] = (22,)
  values = random_values({n: shapes[n] for n in convert.tf.LOGITS}, seed=5)
  source = convert.Source('ade20k', shapes, lambda n: values.get(n, np.zeros(shapes[n], np.float32)))
  config = model_config('xception_65')
  with pytest.raises(convert.ConversionError, match=re.escape('--logits_classes=1:22')):
    convert.convert(source, config, initialise=False)
  sliced = convert.select_logits_classes(source, convert.parse_slice('1:22'))
  variables, _ = convert.convert(sliced, config, initialise=False)
  logits = variables['params']['logits']['semantic']
  np.testing.assert_array_equal(logits['weights'], values['logits/semantic/weights'][..., 1:])
  np.testing.assert_array_equal(logits['biases'], values['logits/semantic/biases'][1:])


def test_backbone_only_checkpoint_fills_only_the_backbone():
  """An ImageNet backbone checkpoint: backbone + its classifier (skipped), head initialised."""
  for tsv, backbone, scope in ((XCEPTION_TSV, 'xception_65', 'xception_65'),
                               (RESNET_TSV, 'resnet_v1_101_beta', 'resnet_v1_101')):
    full = reference_shapes(tsv)
    shapes = {n: s for n, s in full.items() if n.startswith(scope + '/')}
    shapes[f'{scope}/logits/weights'] = (1, 1, 2048, 1001)
    shapes[f'{scope}/logits/biases'] = (1001,)
    shapes['global_step'] = ()
    config = model_config(backbone)
    variables, report = convert.convert(memory_source(shapes), config, initialise=False)
    assert report.backbone_only
    flat = flat_variables(variables)
    assert set(flat) == {n for n in full if n.startswith(scope + '/')}
    assert report.initialised == sorted(n for n in full if not n.startswith(scope + '/'))
    assert report.skipped_by_rule[f'{scope}/logits/weights'].endswith('ImageNet classifier')
    assert 'backbone-only checkpoint' in report.summary()
    # A backbone that does not match the config still fails, naming what is missing.
    del shapes[f'{scope}/conv1_1/weights' if scope.startswith('resnet') else
               f'{scope}/entry_flow/conv1_1/weights']
    with pytest.raises(convert.ConversionError, match=re.escape('conv1_1/weights (3, 3, 3,')):
      convert.convert(memory_source(shapes), config, initialise=False)


def test_wrong_backbone_gets_a_hint():
  shapes = reference_shapes(RESNET_TSV)
  with pytest.raises(convert.ConversionError,
                     match='holds backbone resnet_v1_101 but config.model.backbone is'):
    convert.convert(memory_source(shapes), model_config('xception_65'), initialise=False)


def test_skip_rules():
  assert convert.core._rule_reason('global_step') == 'training step counter'
  assert convert.core._rule_reason('aspp0/weights/Momentum') == 'optimizer slot'
  assert convert.core._rule_reason('aspp0/weights/ExponentialMovingAverage') == 'moving-average shadow'
  assert convert.core._rule_reason('resnet_v1_50/logits/biases').endswith('ImageNet classifier')
  assert convert.core._rule_reason('xception_71/logits/weights').endswith('ImageNet classifier')
  assert convert.core._rule_reason('logits/semantic/weights') is None
  assert convert.core._rule_reason('xception_65/exit_flow/block2/unit_1/xception_module/'
                              'separable_conv3_pointwise/weights') is None
