"""Layers against independent references: TensorFlow's own ops (the official code's semantics),
and autodiff of the plain formulation for the written-out backward passes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax import lax

from deeplab_jax.models import layers


@pytest.mark.parametrize('stride,rate,size', [(1, 1, 9), (1, 2, 9), (1, 3, 10), (2, 1, 9),
                                              (2, 1, 10), (2, 1, 11)])
def test_depthwise_impls_match_tensorflow(stride, rate, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size + 1, 5)).astype(np.float32)
  w = rng.normal(size=(3, 3, 5, 1)).astype(np.float32)
  pad = layers.conv_padding(x.shape, 3, stride, rate, explicit_padding=True)
  if stride > 1:  # TF's separable_conv2d_same: fixed padding, then VALID.
    xp = tf.pad(x, [[0, 0], list(pad[0]), list(pad[1]), [0, 0]])
    ref = tf.nn.depthwise_conv2d(xp, w, [1, stride, stride, 1], 'VALID').numpy()
  else:
    ref = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], 'SAME', dilations=[rate, rate]).numpy()
  for impl in ('grouped', 'shift'):
    out = layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride, rate, pad, impl)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=impl)


@pytest.mark.parametrize('kernel,stride,rate,size,explicit', [
    (3, 1, 2, 13, True), (3, 2, 1, 13, True), (3, 2, 1, 12, True), (3, 1, 4, 13, True),
    (3, 2, 1, 12, False), (5, 1, 2, 11, True), (3, 2, 2, 14, True)])
def test_depthwise_gradients_match_tensorflow(kernel, stride, rate, size, explicit):
  """Both impls' gradients (shift-and-add has a hand-written backward pass) against TF's autodiff of
  `tf.nn.depthwise_conv2d` on the same padded input."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, size, size + 3, 6)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 6, 1)).astype(np.float32)
  pad = layers.conv_padding(x.shape, kernel, stride, rate, explicit_padding=explicit)
  x_tf, w_tf = tf.constant(x), tf.constant(w)
  with tf.GradientTape() as tape:
    tape.watch([x_tf, w_tf])
    xp = tf.pad(x_tf, [[0, 0], list(pad[0]), list(pad[1]), [0, 0]])
    if stride > 1:  # TF's depthwise conv cannot combine strides and dilations: dilate the kernel.
      w_eff = np.zeros((layers.effective_kernel(kernel, rate),) * 2 + (6, 1), np.float32)
      idx = np.arange(kernel) * rate
      w_dil = tf.scatter_nd(np.stack(np.meshgrid(idx, idx, indexing='ij'), -1).reshape(-1, 2),
                            tf.reshape(w_tf, (-1, 6, 1)), w_eff.shape)
      out = tf.nn.depthwise_conv2d(xp, w_dil, [1, stride, stride, 1], 'VALID')
    else:
      out = tf.nn.depthwise_conv2d(xp, w_tf, [1, 1, 1, 1], 'VALID', dilations=[rate, rate])
    loss = tf.reduce_sum(tf.sin(out))
  ref = [t.numpy() for t in tape.gradient(loss, [x_tf, w_tf])]

  def jax_loss(x, w, impl):
    return jnp.sum(jnp.sin(layers.depthwise_conv(x, w, stride, rate, pad, impl)))

  for impl in ('grouped', 'shift'):
    got = jax.jit(jax.grad(jax_loss, argnums=(0, 1)), static_argnums=2)(x, w, impl)
    for name, a, b in zip(('d_input', 'd_kernel'), got, ref, strict=True):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f'{impl} {name}')


@pytest.mark.parametrize('stride,size', [(1, 9), (2, 9), (2, 10)])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_pointwise_conv_and_gradients_match_tensorflow(stride, size, dtype):
  """The 1x1 conv as a matmul over (rows, channels) against `tf.nn.conv2d` and TF's autodiff of it,
  from the same (rounded) input: output, input gradient and kernel gradient."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, size, size + 2, 6)).astype(np.float32)
  w = rng.normal(size=(1, 1, 6, 5)).astype(np.float32)
  x_jax, w_jax = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  x, w = np.asarray(x_jax.astype(jnp.float32)), np.asarray(w_jax.astype(jnp.float32))
  x_tf, w_tf = tf.constant(x), tf.constant(w)
  with tf.GradientTape() as tape:
    tape.watch([x_tf, w_tf])
    out = tf.nn.conv2d(x_tf, w_tf, [1, stride, stride, 1], 'VALID')
    loss = tf.reduce_sum(tf.sin(out))
  ref = [out.numpy()] + [t.numpy() for t in tape.gradient(loss, [x_tf, w_tf])]

  def jax_loss(x, w):
    y = layers.pointwise_conv(x, w, stride)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  (_, y), grads = jax.jit(jax.value_and_grad(jax_loss, (0, 1), has_aux=True))(x_jax, w_jax)
  tol = 2e-5 if dtype == 'float32' else 1e-2
  for name, a, b in zip(('output', 'd_input', 'd_kernel'), (y, *grads), ref, strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol,
                               atol=tol * max(np.abs(b).max(), 1.0), err_msg=name)


@pytest.mark.parametrize('kernel,stride,rate,size', [(3, 2, 1, 10), (7, 2, 1, 11), (3, 1, 2, 9),
                                                     (1, 2, 1, 10)])
def test_conv_padding_matches_tf_conv2d_same(kernel, stride, rate, size):
  """slim's conv2d_same: fixed padding + VALID when strided, SAME otherwise."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
  if stride > 1:
    pb, pe = layers.fixed_padding(kernel, rate)
    assert (pb, pe) == ((kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2)
    ref = tf.nn.conv2d(tf.pad(x, [[0, 0], [pb, pe], [pb, pe], [0, 0]]), w, stride, 'VALID')
  else:
    ref = tf.nn.conv2d(x, w, stride, 'SAME', dilations=rate)
  module = layers.ConvBN(4, kernel, stride=stride, rate=rate, use_bn=False, activation=None)
  out = module.apply({'params': {'weights': jnp.asarray(w)}}, jnp.asarray(x))
  np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('in_size,out_size', [((5, 7), (17, 25)), ((33, 33), (129, 129)),
                                              ((9, 4), (3, 2)), ((1, 1), (5, 5))])
def test_resize_bilinear_align_corners_matches_tf1(in_size, out_size):
  x = np.random.default_rng(3).normal(size=(2, *in_size, 3)).astype(np.float32)
  ref = tf.compat.v1.image.resize_bilinear(x, out_size, align_corners=True).numpy()
  np.testing.assert_allclose(layers.resize_bilinear(jnp.asarray(x), out_size), ref, atol=1e-5)


def test_max_pool_same_matches_tf():
  x = np.random.default_rng(4).normal(size=(1, 10, 9, 2)).astype(np.float32)
  ref = tf.nn.max_pool2d(x, 3, 2, 'SAME').numpy()
  np.testing.assert_allclose(layers.max_pool_same(jnp.asarray(x), 3, 2), ref)


def test_batch_norm_train_and_inference():
  rng = np.random.default_rng(5)
  x = rng.normal(2.0, 3.0, size=(4, 5, 5, 3)).astype(np.float32)
  bn = layers.BatchNorm(layers.BatchNormConfig(decay=0.9, epsilon=1e-3))
  variables = bn.init(jax.random.key(0), x, train=True)
  gamma = np.array([1.0, 2.0, 0.5], np.float32)
  params = {'gamma': jnp.asarray(gamma), 'beta': jnp.asarray([0.0, 1.0, -1.0])}
  y, updates = bn.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
                        mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * gamma + params['beta'],
                             atol=1e-4)
  n = x.size // 3
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['moving_mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats['moving_variance'], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  y_inf = bn.apply({'params': params, 'batch_stats': stats}, x, train=False)
  expected = ((x - stats['moving_mean']) / np.sqrt(stats['moving_variance'] + 1e-3) * gamma
              + params['beta'])
  np.testing.assert_allclose(y_inf, expected, atol=1e-4)


def _plain_batch_norm(x, gamma, beta, epsilon):
  """Train-mode BatchNorm as plain jnp, float32 statistics and the scale and shift applied in x's
  dtype as the layer does (autodiff derives its gradient): the reference."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, (0, 1, 2))
  var = jnp.mean(jnp.square(xf - mean), (0, 1, 2))
  scale = gamma * lax.rsqrt(var + epsilon)
  return x * scale.astype(x.dtype) + (beta - mean * scale).astype(x.dtype), mean, var


@pytest.mark.parametrize('shape,offset', [((2, 9, 7, 5), 0.0), ((3, 4, 4, 16), 6.0),
                                          ((1, 1, 1, 8), 0.0), ((4, 17, 17, 3), -3.0)])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_batch_norm_train_gradients_match_autodiff(shape, offset, dtype):
  """`batch_norm_train`'s written-out backward pass against autodiff of the plain formula, with
  cotangents on all three outputs (the statistics' own terms included) and channel means away
  from zero (the one-pass sum of g * (x - mean) must not lose precision)."""
  rng = np.random.default_rng(7)
  channels = shape[-1]
  x = (rng.normal(size=shape) * rng.uniform(0.5, 2.0, channels)
       + offset * rng.uniform(0.5, 1.5, channels)).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  beta = rng.normal(size=channels).astype(np.float32)
  w_y = rng.normal(size=shape).astype(np.float32)
  w_mean, w_var = rng.normal(size=channels), rng.normal(size=channels)
  x = jnp.asarray(x, dtype)

  def loss(fn, x, gamma, beta):
    y, mean, var = fn(x, gamma, beta, 1e-3)
    return (jnp.sum(y.astype(jnp.float32) * w_y) + jnp.sum(mean * w_mean)
            + jnp.sum(var * w_var))

  got_out = layers.batch_norm_train(x, gamma, beta, 1e-3)
  got = jax.jit(jax.grad(functools.partial(loss, layers.batch_norm_train), (0, 1, 2)))(
      x, gamma, beta)
  want_out = _plain_batch_norm(x, gamma, beta, 1e-3)
  # Gradients against autodiff of the plain formula in float32 from the same rounded input and
  # cotangent: in bfloat16, autodiff's own arithmetic would be the larger error.
  w_y = jnp.asarray(w_y, dtype).astype(jnp.float32)
  want = jax.grad(functools.partial(loss, _plain_batch_norm), (0, 1, 2))(
      x.astype(jnp.float32), gamma, beta)
  tol = 1e-5 if dtype == 'float32' else 1e-2
  for name, a, b in zip(('y', 'mean', 'var'), got_out, want_out, strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol, err_msg=name)
  for name, a, b in zip(('d_x', 'd_gamma', 'd_beta'), got, want, strict=True):
    b = np.asarray(b, np.float32)
    scale = max(np.abs(b).max(), 1.0)  # A single row: d_x is exactly 0, up to rounding of O(1) terms.
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol * scale,
                               err_msg=name)


def test_atrous_plan_follows_stack_blocks_dense():
  strides = [[2], [2], [2], [1] * 3, [2], [1]]  # Xception-65: root stride 2.
  assert layers.atrous_plan(strides, 16, 2)[-2:] == [[(1, 1)], [(1, 2)]]
  assert layers.atrous_plan(strides, 8, 2)[2:] == [[(1, 1)], [(1, 2)] * 3, [(1, 2)], [(1, 4)]]
  assert layers.atrous_plan(strides, 32, 2)[-2:] == [[(2, 1)], [(1, 1)]]
  with pytest.raises(ValueError, match='cannot be reached'):
    layers.atrous_plan(strides, 64, 2)


def exported(fn, args, shapes):
  """`fn` through a shape-polymorphic `jax.export` with `shapes` (e.g. 'b, h, w, c')."""
  specs = jax.export.symbolic_args_specs(args, shapes)
  return jax.export.export(jax.jit(fn), platforms=('cpu',))(*specs)


def test_resize_bilinear_with_symbolic_sizes_matches_tf1():
  """The interpolation matrices built in the program for symbolic sizes give TF's resize."""
  rng = np.random.default_rng(6)
  resize = exported(lambda x, target: layers.resize_bilinear(x, target.shape[1:3]),
                    (np.zeros((1, 5, 7, 3), np.float32), np.zeros((1, 9, 9, 1), np.float32)),
                    ('b, h, w, c', '1, p, q, 1'))
  for in_size, out_size in (((5, 7), (17, 25)), ((9, 4), (3, 2)), ((1, 1), (5, 5)),
                            ((6, 6), (6, 6)), ((33, 33), (129, 129))):
    x = rng.normal(size=(2, *in_size, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(x, out_size, align_corners=True).numpy()
    out = resize.call(x, np.zeros((1, *out_size, 1), np.float32))
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f'{in_size} -> {out_size}')


def test_convs_with_symbolic_sizes_match_tensorflow():
  """SAME-padded dense and grouped depthwise convs whose padding depends on a symbolic size."""
  rng = np.random.default_rng(7)
  w_dw = rng.normal(size=(3, 3, 4, 1)).astype(np.float32)
  w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)

  def convs(x):
    out = []
    for stride, rate in ((1, 2), (2, 1)):
      pad = layers.conv_padding(x.shape, 3, stride, rate, explicit_padding=False)
      out.append(layers.depthwise_conv(x, jnp.asarray(w_dw), stride, rate, pad, 'grouped'))
    module = layers.ConvBN(5, 3, stride=2, use_bn=False, activation=None, explicit_padding=False)
    out.append(module.apply({'params': {'weights': jnp.asarray(w)}}, x))
    return out

  program = exported(convs, (np.zeros((1, 9, 9, 4), np.float32),), ('b, h, w, 4',))
  for size in ((9, 10), (12, 13)):
    x = rng.normal(size=(2, *size, 4)).astype(np.float32)
    refs = [tf.nn.depthwise_conv2d(x, w_dw, [1, 1, 1, 1], 'SAME', dilations=[2, 2]),
            tf.nn.depthwise_conv2d(x, w_dw, [1, 2, 2, 1], 'SAME'), tf.nn.conv2d(x, w, 2, 'SAME')]
    for out, ref in zip(program.call(x), refs, strict=True):
      np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-5)


class _SeparableUnit(nn.Module):
  """One `separable_conv` as a module, in either of its forms: ReLU before it (Xception's
  backbone) or ReLU after each BatchNorm (Xception's last block, ASPP, decoder)."""

  stride: int
  rate: int
  pre_relu: bool
  fused: bool | None
  dtype: str = 'float32'
  impl: str = 'shift'
  bn: layers.BatchNormConfig = layers.BatchNormConfig(decay=0.9, epsilon=1e-3)

  @nn.compact
  def __call__(self, x, train):
    return layers.separable_conv(
        x, 12, 'unit', train=train, stride=self.stride, rate=self.rate,
        activation=None if self.pre_relu else nn.relu,
        pre_activation=nn.relu if self.pre_relu else None, bn=self.bn, impl=self.impl,
        dtype=jnp.dtype(self.dtype), fused=self.fused)


_FUSED_CASES = [(stride, rate, pre_relu, dtype, 'shift')
                for stride, rate in [(1, 1), (2, 1), (1, 2), (1, 3), (1, 4), (2, 2)]
                for pre_relu in (True, False) for dtype in ('float32', 'bfloat16')]
# The grouped depthwise conv (the GPU/TPU default) inside the fused unit.
_FUSED_CASES += [(2, 1, True, 'float32', 'grouped'), (1, 3, False, 'float32', 'grouped')]


@pytest.mark.parametrize('stride,rate,pre_relu,dtype,impl', _FUSED_CASES)
def test_fused_separable_unit_matches_composed_layers(stride, rate, pre_relu, dtype, impl):
  """The fused training unit against the composed layers: output, moving statistics and the
  gradients of the input and all six parameters, with an input whose channel means are away from
  zero (the ReLU masks and the BatchNorm sums both matter)."""
  rng = np.random.default_rng(stride * 10 + rate)
  x = jnp.asarray(rng.normal(size=(2, 11, 10, 8)) + 0.3, dtype)
  fused = _SeparableUnit(stride, rate, pre_relu, True, dtype, impl)
  composed = _SeparableUnit(stride, rate, pre_relu, False, dtype, impl)
  variables = composed.init(jax.random.key(0), x, train=False)
  params = jax.tree.map(lambda p: p * rng.uniform(0.7, 1.3, p.shape).astype(np.float32) + 0.05,
                        variables['params'])
  stats = variables['batch_stats']
  out_shape = fused.apply({'params': params, 'batch_stats': stats}, x, True,
                          mutable=['batch_stats'])[0].shape
  w = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def loss(module, params, x):
    y, updates = module.apply({'params': params, 'batch_stats': stats}, x, True,
                              mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * w), (y, updates['batch_stats'])

  def run(module):
    return jax.jit(jax.value_and_grad(functools.partial(loss, module), (0, 1), has_aux=True))(
        params, x)

  (_, (y_f, stats_f)), grads_f = run(fused)
  (_, (y_c, stats_c)), grads_c = run(composed)
  tol = 1e-5 if dtype == 'float32' else 2e-2
  leaves = [('y', y_f, y_c)]
  leaves += [(jax.tree_util.keystr(k), a, b) for (k, a), b in zip(
      jax.tree_util.tree_leaves_with_path(stats_f), jax.tree.leaves(stats_c), strict=True)]
  leaves += [(jax.tree_util.keystr(k), a, b) for (k, a), b in zip(
      jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_c), strict=True)]
  assert len(leaves) == 1 + 4 + 7
  for name, a, b in leaves:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, name
    scale = max(np.abs(b).max(), 1e-3)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)


def test_separable_conv_picks_the_fused_unit_only_where_it_applies():
  x = jnp.ones((1, 5, 5, 4))
  unit = _SeparableUnit(1, 1, True, None)
  variables = unit.init(jax.random.key(0), x, train=False)

  def fused_calls(module, train):
    jaxpr = jax.make_jaxpr(lambda v: module.apply(v, x, train, mutable=['batch_stats']))(variables)
    return str(jaxpr).count('separable_unit_train')

  assert fused_calls(unit, True) == 1
  assert fused_calls(unit, False) == 0
  frozen = layers.BatchNormConfig(frozen=True)
  assert fused_calls(unit.clone(bn=frozen), True) == 0
  with pytest.raises(ValueError, match='fused separable unit is for training'):
    unit.clone(bn=frozen, fused=True).apply(variables, x, True)
