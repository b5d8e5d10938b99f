"""The benchmark command on a tiny model: both modes, the JSON fields, the matmul reference and the
per-op-class breakdown of a profiled step."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from deeplab_jax import config as config_lib
from deeplab_jax import multiply_adds, op_profile
from deeplab_jax.tools import benchmark

FIELDS = ('device', 'device_count', 'compile_s', 'step_time_median_s', 'step_time_min_s',
          'images_per_s', 'peak_memory_bytes', 'multiply_adds', 'flops_per_s', 'flops_convention',
          'matmul_flops_per_s', 'peak_fraction')
POSITIVE = ('device_count', 'compile_s', 'step_time_median_s', 'step_time_min_s', 'images_per_s',
            'peak_memory_bytes', 'multiply_adds', 'flops_per_s', 'matmul_flops_per_s',
            'peak_fraction')
TINY = {  # Small enough to compile in seconds; the CLI test passes them as --config.x=y.
    'model.backbone': 'xception_41',
    **{f'model.{k}': v for k, v in config_lib.TINY_MODEL.items()},
    'train.crop_size': (33, 33),
    'eval.crop_size': (33, 33),
    'train.batch_size': 4,
    'eval.batch_size': 1,
}


def tiny_config() -> ml_collections.ConfigDict:
  config = config_lib.get_base_config()
  for field, value in TINY.items():
    group, name = field.split('.')
    config[group][name] = value
  return config


def check_result(result: dict, mode: str, batch: int) -> None:
  assert set(FIELDS) <= set(result)
  json.dumps(result)
  for field in POSITIVE:
    assert result[field] > 0 and math.isfinite(result[field]), (field, result[field])
  assert result['step_time_min_s'] <= result['step_time_median_s']
  assert result['compiled_temp_bytes'] is None or result['compiled_temp_bytes'] >= 0
  assert result['step_system_cpu_s_median'] >= 0 and result['step_minor_faults_median'] >= 0
  assert result['mode'] == mode and result['batch'] == batch
  assert result['images_per_s'] == pytest.approx(batch / result['step_time_median_s'])
  passes = 3 if mode == 'train' else 1
  assert result['flops_per_s'] == pytest.approx(
      2 * result['multiply_adds'] * passes * result['images_per_s'])
  assert result['peak_fraction'] == pytest.approx(
      result['flops_per_s'] / result['matmul_flops_per_s'])


def check_breakdown(result: dict) -> None:
  assert set(result['op_time_s']) == set(op_profile.CLASSES)
  assert all(v >= 0 for v in result['op_time_s'].values())
  assert sum(result['op_time_s'].values()) == pytest.approx(result['op_time_total_s'])
  assert sum(result['op_fractions'].values()) == pytest.approx(1.0)
  assert result['op_time_s']['matmul'] > 0 and result['op_time_s']['batchnorm'] > 0
  seconds = [s for _, _, s, _ in result['top_ops']]
  assert seconds == sorted(seconds, reverse=True) and math.isfinite(seconds[0])
  assert all(cls in op_profile.CLASSES for _, cls, _, _ in result['top_ops'])


def test_kernel_share_counts_the_page_faults_of_fresh_memory():
  """64 MiB written into fresh pages faults at least once per 2 MiB (huge pages) and at most about
  once per 4 KiB page; a call that touches no new memory faults far less."""
  size = 64 << 20
  seconds, system_s, faults = benchmark._kernel_share(lambda: np.ones(size, np.uint8))
  assert seconds > 0 and system_s >= 0
  assert size // (2 << 20) <= faults <= 2 * size // 4096, faults
  kept = np.ones(size, np.uint8)
  _, _, refaults = benchmark._kernel_share(lambda: kept.fill(2))
  assert refaults < size // (2 << 20), refaults


def test_infer_counts_the_eval_crop():
  config = tiny_config()
  config.model.depthwise_impl = 'grouped'
  result = benchmark.benchmark(config, 'infer', steps=2, matmul_size=128, matmul_floor=True)
  check_result(result, 'infer', batch=1)
  assert result['depthwise_impl'] == 'grouped'
  assert result['crop_size'] == [33, 33]
  assert result['multiply_adds'] == multiply_adds.count(config, crop_size=(33, 33))['multiply_adds']
  check_breakdown(result)
  assert result['op_time_s']['depthwise'] > 0  # The grouped convolutions.
  # The dense ops: the model's multiply-adds less the depthwise ones (grouped convs, not counted),
  # plus the bilinear resizes, which XLA computes as dots (the hand counts: test_op_profile.py).
  flops = 2 * result['multiply_adds']
  assert 0.5 * flops < result['matmul_flops'] < 1.1 * flops
  assert result['matmul_floor_s'] > 0 and result['dense_op_count'] >= 20


def test_train_step_over_all_devices():
  config = tiny_config()
  config.model.depthwise_impl = 'shift'
  result = benchmark.benchmark(config, 'train', steps=2, matmul_size=128)
  check_result(result, 'train', batch=4)
  assert result['depthwise_impl'] == 'shift'
  assert result['devices_used'] == result['device_count']  # 4 forced CPU devices divide 4.
  assert 'forward + backward' in result['flops_convention']
  check_breakdown(result)
  assert result['op_time_s']['depthwise'] > 0  # The shift-and-add taps, named by their layer.


def test_bad_mode_is_rejected():
  with pytest.raises(ValueError, match='mode'):
    benchmark.benchmark(tiny_config(), 'eval')


def test_command_prints_one_json_object(tmp_path):
  path = tmp_path / 'base.py'
  path.write_text('from deeplab_jax.config import get_base_config\n\n\ndef get_config():\n'
                  '  return get_base_config()\n')
  overrides = [f'--config.{k}={v}'.replace(' ', '') for k, v in TINY.items()]
  out = subprocess.run(
      # The older module name (kept for existing commands) runs deeplab_jax.tools.benchmark.
      [sys.executable, '-m', 'deeplab_jax.benchmark', f'--config={path}', '--mode=infer',
       '--batch=2', '--steps=1', '--matmul_size=64', '--config.model.depthwise_impl=grouped',
       '--op_breakdown=false', '--matmul_floor', *overrides],
      capture_output=True, text=True, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  check_result(result, 'infer', batch=2)
  assert 'op_time_s' not in result and result['matmul_floor_s'] > 0
  assert result['depthwise_impl'] == 'grouped'
  assert result['backbone'] == 'xception_41'


def test_folded_batch_norm_inference_and_its_train_error():
  result = benchmark.benchmark(tiny_config(), 'infer', steps=1, matmul_size=64, op_breakdown=False,
                               fold_batch_norm=True)
  check_result(result, 'infer', batch=1)
  assert result['fold_batch_norm'] is True and 'op_time_s' not in result
  with pytest.raises(ValueError, match='fold_batch_norm is for --mode=infer'):
    benchmark.prepare(tiny_config(), 'train', fold_batch_norm=True)
