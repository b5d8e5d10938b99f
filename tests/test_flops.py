"""`deeplab_jax.multiply_adds` reproduces the paper's Multiply-Adds table (Tables 3 and 5)."""

import json
import subprocess
import sys

import pytest

from deeplab_jax import config as config_lib
from deeplab_jax import multiply_adds

MS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# (backbone, train OS, eval OS, decoder, separable, paper's billions of multiply-adds, tolerance)
ROWS = [
    ('resnet_v1_101_beta', 16, 16, False, False, 81.02, 0.015),
    ('resnet_v1_101_beta', 16, 8, False, False, 276.18, 0.015),
    ('resnet_v1_101_beta', 16, 16, True, False, 101.28, 0.02),  # Paper typo (graph: 102.80).
    ('resnet_v1_101_beta', 16, 8, True, False, 297.92, 0.015),
    ('resnet_v1_101_beta', 32, 32, False, False, 52.43, 0.015),
    ('resnet_v1_101_beta', 32, 32, True, False, 74.20, 0.015),
    ('xception_65', 16, 16, False, False, 68.00, 0.015),
    ('xception_65', 16, 8, False, False, 240.85, 0.015),
    ('xception_65', 16, 16, True, False, 89.76, 0.015),
    ('xception_65', 16, 8, True, False, 262.59, 0.015),
    ('xception_65', 16, 16, True, True, 54.17, 0.015),
    ('xception_65', 16, 8, True, True, 177.10, 0.015),
]


# MobileNetV2 zoo head (image pooling + 1x1 ASPP, no decoder), 513x513: (depth multiplier, eval OS,
# TF profiler's conv multiply-adds of the official graph, model zoo's figure or None).
MOBILENET_ROWS = [
    (1.0, 16, 2.742, 2.75),
    (0.5, 16, 0.868, 0.88),
    (1.0, 8, 8.840, None),
    (0.5, 8, 2.826, 2.84),  # The zoo's 2.84B is of the dm05 trainval model (OS 8).
]


def config_for(backbone, train_os, eval_os, decoder, separable):
  c = config_lib.get_base_config()
  c.model.backbone = backbone
  c.model.output_stride = train_os
  c.eval.output_stride = eval_os
  c.model.decoder = decoder
  c.model.aspp_separable = c.model.decoder_separable = separable
  return c


@pytest.mark.parametrize('row', MOBILENET_ROWS, ids=lambda r: f'dm{r[0]}-os{r[1]}')
def test_mobilenet_v2_model_zoo_multiply_adds(row):
  dm, eval_os, profiler, zoo = row
  c = config_for('mobilenet_v2', 16, eval_os, False, False)
  c.model.atrous_rates = ()
  c.model.width_multiplier = dm
  result = multiply_adds.count(c)
  assert result['multiply_adds_tf'] / 1e9 == pytest.approx(profiler, rel=0.002)
  if zoo is not None:
    assert result['multiply_adds_tf'] / 1e9 == pytest.approx(zoo, rel=0.02)


@pytest.mark.parametrize('row', ROWS, ids=lambda r: '-'.join(map(str, r[:5])))
def test_paper_multiply_adds_table(row):
  *setting, paper, tol = row
  result = multiply_adds.count(config_for(*setting))
  assert result['multiply_adds_tf'] / 1e9 == pytest.approx(paper, rel=tol)
  # A native dilated conv does not pay for TF's space_to_batch grid.
  assert result['multiply_adds'] <= result['multiply_adds_tf']
  if setting[1:3] == [16, 8] and not setting[3] and setting[0] == 'xception_65':
    assert result['multiply_adds'] / 1e9 == pytest.approx(227.0, rel=0.005)


@pytest.mark.parametrize('eval_os,paper', [(16, 928.81), (8, 3055.35)])
def test_multi_scale_and_flip(eval_os, paper):
  c = config_for('xception_65', 16, eval_os, True, True)
  c.eval.scales, c.eval.flip = MS, True
  assert multiply_adds.count(c)['multiply_adds_tf'] / 1e9 == pytest.approx(paper, rel=0.03)


def test_command_line_prints_one_json_object(tmp_path):
  config = tmp_path / 'config.py'
  config.write_text('from deeplab_jax.config import get_base_config\n\n'
                    'def get_config():\n  return get_base_config()\n')
  out = subprocess.run([sys.executable, '-m', 'deeplab_jax.tools.flops', f'--config={config}',
                        '--config.model.decoder=False', '--config.model.aspp_separable=False',
                        '--config.eval.output_stride=16'],
                       capture_output=True, text=True, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['multiply_adds_tf'] / 1e9 == pytest.approx(68.00, rel=0.015)
  assert result['params'] > 0 and result['decoder'] is False
