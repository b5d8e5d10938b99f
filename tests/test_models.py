"""The network: shapes at every output stride, pinned parameter counts, TF names, depthwise impls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from reference_data import RESNET_TSV, XCEPTION_TSV, reference_shapes

from deeplab_jax import config as config_lib
from deeplab_jax import models

# Full-size DeepLab v3+ (SC ASPP + decoder, 21 classes): parameter counts, the same at every OS.
PARAMS = {
    'xception_41': 28_108_661,
    'xception_65': 41_055_413,
    'xception_71': 43_477_837,
    'resnet_v1_50': 26_696_133,
    'resnet_v1_101': 45_688_261,
    'resnet_v1_50_beta': 26_819_909,
    'resnet_v1_101_beta': 45_812_037,
}


def model_config(backbone='xception_65', **overrides):
  config = config_lib.get_base_config().model
  config.backbone = backbone
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_config(backbone, **overrides):
  return model_config(backbone, width_multiplier=0.0625, aspp_channels=8, low_level_channels=4,
                      decoder_channels=8, num_classes=3, **overrides)


def count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('backbone', PARAMS)  # MobileNetV2: tests/test_mobilenet_v2.py.
def test_full_size_shapes_and_params_at_every_output_stride(backbone):
  x = jax.ShapeDtypeStruct((2, 513, 513, 3), jnp.float32)
  counts = set()
  for os_ in (8, 16, 32):
    model = models.build_model(model_config(backbone), os_)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 513, 513, 21)
    counts.add(count(variables['params']))
    backbone_module = models.build_backbone(backbone, os_)
    feats = jax.eval_shape(
        lambda v, x, m=backbone_module: m.apply(v, x),
        {'params': variables['params'][models.backbone_scope(backbone)],
         'batch_stats': variables['batch_stats'][models.backbone_scope(backbone)]}, x)
    assert feats.decoder.shape[1:3] == (129, 129)
    assert feats.by_stride[4].shape[1:3] == (129, 129)
    size = (512 // os_) + 1
    assert feats.by_stride[os_].shape == (2, size, size, 2048), (os_, feats.by_stride[os_].shape)
    assert max(feats.by_stride) == os_
  assert counts == {PARAMS[backbone]}


@pytest.mark.parametrize('backbone,reference', [('xception_65', XCEPTION_TSV),
                                               ('resnet_v1_101_beta', RESNET_TSV)])
def test_variable_names_are_the_official_tf_names(backbone, reference):
  model = models.build_model(model_config(backbone))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  ours = {'/'.join(k): tuple(v.shape) for col in ('params', 'batch_stats')
          for k, v in traverse_util.flatten_dict(variables[col]).items()}
  assert ours == reference_shapes(reference)


@pytest.mark.parametrize('backbone', ['xception_41', 'xception_71', 'resnet_v1_50',
                                      'resnet_v1_50_beta'])
@pytest.mark.parametrize('decoder', [True, False])
def test_tiny_model_same_params_every_output_stride(backbone, decoder):
  """The variables of output stride 16 fit the model at 8 and 32 (shapes only: no compile)."""
  x = jax.ShapeDtypeStruct((2, 33, 33, 3), jnp.float32)
  variables = jax.eval_shape(models.build_model(tiny_config(backbone, decoder=decoder), 16).init,
                             jax.random.key(0), x)
  for os_ in (8, 16, 32):
    model = models.build_model(tiny_config(backbone, decoder=decoder), os_)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 33, 33, 3)


@pytest.fixture(scope='module')
def tiny_xception():
  """(images, variables) of the tiny Xception-41 (the same variables at every output stride)."""
  x = jax.random.uniform(jax.random.key(1), (2, 33, 33, 3), maxval=255.0)
  return x, jax.jit(models.build_model(tiny_config('xception_41'), 16).init)(jax.random.key(0), x)


def test_tiny_forward_every_output_stride(tiny_xception):
  x, variables = tiny_xception
  for os_ in (8, 16, 32):
    logits = jax.jit(models.build_model(tiny_config('xception_41'), os_).apply)(variables, x)
    assert logits.shape == (2, 33, 33, 3)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_depthwise_impls_equal_on_the_whole_model(tiny_xception):
  x, variables = tiny_xception
  labels = jax.random.randint(jax.random.key(2), (2, 33, 33), 0, 3)
  config = tiny_config('xception_41', output_stride=8)

  def loss(params, impl):
    model = models.build_model(config, depthwise_impl=impl)
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(3)})
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)), logits

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l_g, out_g), g_g = value_and_grad(variables['params'], 'grouped')
  (l_s, out_s), g_s = value_and_grad(variables['params'], 'shift')
  np.testing.assert_allclose(out_g, out_s, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_g, l_s, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_g), jax.tree_util.tree_leaves(g_s), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_preprocessing_maps_mean_pixel_to_zero():
  for backbone in models.BACKBONES:
    pixel = jnp.asarray(models.mean_pixel(backbone), jnp.float32)[None, None, None]
    np.testing.assert_allclose(models.preprocess(pixel, backbone), 0.0, atol=1e-5)


def test_atrous_rates_follow_the_output_stride():
  config = model_config()
  assert models.atrous_rates(config, 16) == (6, 12, 18)
  assert models.atrous_rates(config, 8) == (12, 24, 36)
  assert models.atrous_rates(config, 32) == (3, 6, 9)
  config.atrous_rates = (4, 8, 12)  # Given for the training OS 16: scaled at eval OS 8.
  assert models.atrous_rates(config, 8) == (8, 16, 24)


def test_bad_model_config_errors_name_the_field():
  with pytest.raises(ValueError, match='config.model.backbone'):
    models.build_model(model_config('vgg16'))
  with pytest.raises(ValueError, match='output_stride'):
    models.build_model(model_config(), 4)
  with pytest.raises(ValueError, match='multi_grid'):
    models.build_model(model_config(multi_grid=(1, 2)))
