"""MobileNetV2 DeepLab (the model zoo's mobile model): official names, channels, atrous rule,
shapes at every output stride, and the official graph's outputs from a converted checkpoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from reference_data import (
    MOBILENET_DM05_TSV,
    MOBILENET_TSV,
    reference_image,
    reference_outputs,
    reference_shapes,
    reference_values,
)
from test_convert_tf import write_tf1_checkpoint

from deeplab_jax import config as config_lib
from deeplab_jax import convert, models
from deeplab_jax.models import mobilenet_v2

# depth multiplier -> (parameters, all values incl. BatchNorm statistics = the official graph's).
COUNTS = {1.0: (2_113_557, 2_146_645), 0.5: (697_013, 714_325)}
TSVS = {1.0: MOBILENET_TSV, 0.5: MOBILENET_DM05_TSV}


def model_config(width_multiplier: float = 1.0):
  """configs/voc_mobilenetv2.py's model."""
  m = config_lib.get_base_config().model
  m.backbone = 'mobilenet_v2'
  m.atrous_rates = ()
  m.decoder = False
  m.width_multiplier = width_multiplier
  return m


def flat_shapes(variables) -> dict[str, tuple[int, ...]]:
  return {'/'.join(k): tuple(v.shape) for c in ('params', 'batch_stats')
          for k, v in traverse_util.flatten_dict(variables[c]).items()}


@pytest.mark.parametrize('dm', [1.0, 0.5])
def test_names_shapes_and_counts_are_the_official_graph(dm):
  x = jax.ShapeDtypeStruct((2, 513, 513, 3), jnp.float32)
  out_channels = {1.0: 320, 0.5: 160}[dm]
  low_level = {1.0: 144, 0.5: 72}[dm]
  for os_ in (8, 16, 32):
    model = models.build_model(model_config(dm), os_)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    assert flat_shapes(variables) == reference_shapes(TSVS[dm])
    params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables['params']))
    values = sum(int(np.prod(s)) for s in flat_shapes(variables).values())
    assert (params, values) == COUNTS[dm]
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 513, 513, 21)
    backbone = models.build_backbone('mobilenet_v2', os_, width_multiplier=dm)
    scope = models.backbone_scope('mobilenet_v2')
    feats = jax.eval_shape(lambda v, x, m=backbone: m.apply(v, x),
                           {c: variables[c][scope] for c in ('params', 'batch_stats')}, x)
    size = 512 // os_ + 1
    assert feats.by_stride[os_].shape == (2, size, size, out_channels)
    assert max(feats.by_stride) == os_
    assert feats.decoder.shape == (2, 129, 129, low_level)  # layer_4/depthwise_output.


def test_channels_and_atrous_rule_follow_mobilenet_base():
  """The official graph's channels (dm 0.5: whole channels, dm 1: multiples of 8) and the
  (stride, depthwise rate) of every block: de-strided layers keep the previous rate."""
  half = mobilenet_v2.block_fields(0.5, 16)
  assert mobilenet_v2.scaled_depth(32, 0.5) == 16
  assert [f['depth'] for f in half] == [8, 12, 12, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 80, 80,
                                        80, 160]
  assert [f['expansion'] for f in half[1:]] == [48, 72, 72, 96, 96, 96] + [192] * 4 + [288] * 3 + [
      480] * 3
  assert half[0]['expansion'] == 16  # No expand conv in layer_2.
  plans = {os_: [(f['stride'], f['rate']) for f in mobilenet_v2.block_fields(1.0, os_)]
           for os_ in (8, 16, 32)}
  assert plans[32] == [(b.stride, 1) for b in mobilenet_v2.BLOCKS]
  assert plans[16][12:] == [(1, 1), (1, 1), (1, 2), (1, 2), (1, 2)]  # expanded_conv_13: s1 r1.
  assert plans[8][6:9] == [(1, 1), (1, 2), (1, 2)]  # expanded_conv_6: s1 r1, then rate 2.
  assert plans[8][12:] == [(1, 2), (1, 2), (1, 4), (1, 4), (1, 4)]
  assert mobilenet_v2.make_divisible(24 * 0.35, 8) == 8 and mobilenet_v2.make_divisible(20, 8) == 24


@pytest.fixture(scope='module')
def official_checkpoint(tmp_path_factory) -> str:
  """A TF1 checkpoint with the official names and the reference outputs' values."""
  prefix = str(tmp_path_factory.mktemp('mnv2') / 'model.ckpt')
  write_tf1_checkpoint(prefix, reference_values(reference_shapes(MOBILENET_TSV)))
  return prefix


@pytest.mark.parametrize('os_,key', [(16, 'logits_os'), (8, 'logits_os8_os')])
def test_converted_checkpoint_reproduces_the_official_graph(official_checkpoint, os_, key):
  """Logits (before the upsampling) and backbone features of the official TF1 graph, 65x65 input."""
  variables, report = convert.convert_tf(official_checkpoint, model_config())
  assert not report.initialised
  reference = reference_outputs()
  model = models.build_model(model_config(), os_)
  logits, captured = model.apply(variables, reference_image(), capture_intermediates=True)
  captured = captured['intermediates']
  ours = np.asarray(captured['logits']['__call__'][0])
  scale = np.abs(reference[key]).max()
  np.testing.assert_allclose(ours, reference[key], rtol=0, atol=1e-5 * scale)  # Reached: 6e-7.
  assert logits.shape == (1, 65, 65, 21)
  if os_ == 16:
    features = np.asarray(captured['MobilenetV2']['__call__'][0].by_stride[16])
    scale = np.abs(reference['features_os16']).max()
    np.testing.assert_allclose(features, reference['features_os16'], rtol=0, atol=1e-5 * scale)


def test_imagenet_checkpoint_fills_the_backbone():
  """The ImageNet `mobilenet_v2_1.0_224` checkpoint: its 1x1 conv to 1280 and `Logits` are the
  classifier (skipped), the DeepLab head keeps its initialisation."""
  shapes = {n: s for n, s in reference_shapes(MOBILENET_TSV).items()
            if n.startswith('MobilenetV2/')}
  shapes.update({'MobilenetV2/Conv_1/weights': (1, 1, 320, 1280),
                 'MobilenetV2/Conv_1/BatchNorm/gamma': (1280,),
                 'MobilenetV2/Logits/Conv2d_1c_1x1/weights': (1, 1, 1280, 1001),
                 'MobilenetV2/Logits/Conv2d_1c_1x1/biases': (1001,)})
  source = convert.Source('imagenet', shapes, lambda n: np.zeros(shapes[n], np.float32))
  _, report = convert.convert(source, model_config(), initialise=False)
  assert report.backbone_only and len(report.filled) == 255
  assert sorted(report.skipped_by_rule) == sorted(n for n in shapes if '/Conv_1/' in n
                                                  or '/Logits/' in n)
  assert report.initialised[0] == 'aspp0/BatchNorm/beta' and len(report.initialised) == 17
