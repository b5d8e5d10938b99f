"""Layers named like TF-slim, so a parameter's path joined by '/' is the official TF variable name.

Convolutions are `lax.conv_general_dilated` with `rhs_dilation` (atrous rate) and, for depthwise
convolutions, `feature_group_count`; 1x1 convolutions are the equivalent matmul over channels.
Depthwise convolutions also have a shift-and-add formulation that XLA:CPU runs an order of magnitude
faster (identical results and gradients); `impl='auto'` picks it on CPU and the grouped convolution
elsewhere. In training, `separable_conv` runs the whole separable unit as one op with a
written-out backward pass (`separable_unit_train`), the same numbers in less memory.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export, lax

from deeplab_jax import reductions

DepthwiseImpl = Literal['auto', 'grouped', 'shift']
Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
RESIZE_SCOPE = 'resize_bilinear'  # Name scope of resize matmuls; the flops count leaves them out.


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
  """TF-slim batch_norm hyper-parameters: `decay` is the moving-average momentum."""

  decay: float = 0.9997
  epsilon: float = 1e-5
  frozen: bool = False  # Use the moving statistics, also in training (no update).
  # Inference only: apply the BatchNorm as a per-channel scale of the preceding conv's kernel and a
  # bias (`fold_batch_norm`); the variables are the unfolded ones, read at apply time.
  folded: bool = False
  # Training inside `jax.shard_map` over this mesh axis: the statistics are the global batch's,
  # summed over the devices in a fixed order (`reductions.ordered_psum`). None: jit over a sharded
  # batch, where XLA reduces over the global batch itself.
  axis_name: str | None = None


def effective_kernel(kernel_size: int, rate: int) -> int:
  return kernel_size + (kernel_size - 1) * (rate - 1)


def fixed_padding(kernel_size: int, rate: int = 1) -> tuple[int, int]:
  """TF's explicit symmetric padding of strided convs (`conv2d_same`, `fixed_padding`)."""
  total = effective_kernel(kernel_size, rate) - 1
  return total // 2, total - total // 2


def same_padding(size: int, kernel_size: int, stride: int, rate: int) -> tuple[int, int]:
  """TF/XLA 'SAME' padding (the extra pixel, if any, goes at the end)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + effective_kernel(kernel_size, rate) - size, 0)
  return total // 2, total - total // 2


def conv_padding(shape: Sequence[int], kernel_size: int, stride: int, rate: int,
                 explicit_padding: bool) -> Padding:
  """Padding of a conv as the official code pads it: fixed padding when strided, else SAME."""
  if stride > 1 and explicit_padding:
    pad = fixed_padding(kernel_size, rate)
    return pad, pad
  return (same_padding(shape[1], kernel_size, stride, rate),
          same_padding(shape[2], kernel_size, stride, rate))


def is_symbolic(*dims: Any) -> bool:
  """Whether any of `dims` is a symbolic dimension (a shape-polymorphic `jax.export`)."""
  return any(export.is_symbolic_dim(d) for d in dims)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding, rate: int = 1,
         groups: int = 1) -> jax.Array:
  """`lax.conv_general_dilated` of NHWC `x` with an HWIO `kernel`.

  Padding that depends on a symbolic input size (SAME padding under a shape-polymorphic export) is
  applied with `jnp.pad` before a VALID conv, because the conv's padding must be integers; concrete
  shapes take the conv's own padding, as always.
  """
  if is_symbolic(*padding[0], *padding[1]):
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    padding = ((0, 0), (0, 0))
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, rhs_dilation=(rate, rate),
                                  dimension_numbers=DIMENSION_NUMBERS, feature_group_count=groups)


def resolve_depthwise_impl(impl: DepthwiseImpl) -> Literal['grouped', 'shift']:
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'grouped'
  if impl not in ('grouped', 'shift'):
    raise ValueError(f"depthwise_impl must be 'auto', 'grouped' or 'shift', got {impl!r}")
  return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, rate: int, padding: Padding,
                   impl: DepthwiseImpl = 'auto') -> jax.Array:
  """Depthwise conv of NHWC `x` with a TF-layout (k, k, C, 1) kernel."""
  k = kernel.shape[0]
  channels = x.shape[-1]
  if resolve_depthwise_impl(impl) == 'grouped':
    return conv(x, kernel.reshape(k, k, 1, channels), stride, padding, rate, groups=channels)
  return _shift_depthwise(x, kernel, stride, rate, padding)


def _shift_sum(xp: jax.Array, kernel: jax.Array, stride: int, rate: int) -> jax.Array:
  """Depthwise conv over the already padded `xp`: for each kernel entry (i, j), the strided window
  of `xp` it multiplies, times that entry's (C,) weights, summed."""
  k = kernel.shape[0]
  k_eff = effective_kernel(k, rate)
  n, hp, wp, channels = xp.shape
  out_h, out_w = (hp - k_eff) // stride + 1, (wp - k_eff) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      tap = lax.slice(xp, (0, i * rate, j * rate, 0),
                      (n, i * rate + (out_h - 1) * stride + 1,
                       j * rate + (out_w - 1) * stride + 1, channels),
                      (1, stride, stride, 1))
      out = tap * kernel[i, j, :, 0] if out is None else out + tap * kernel[i, j, :, 0]
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift_depthwise(x: jax.Array, kernel: jax.Array, stride: int, rate: int,
                     padding: Padding) -> jax.Array:
  """Depthwise conv as k*k shifted multiply-adds over the padded input.

  The backward pass is written out (`_shift_depthwise_bwd`) rather than derived: with autodiff XLA
  keeps the k*k shifted taps of every depthwise conv alive from the forward to the backward pass,
  several times the memory of the grouped conv (docs/performance.md).
  """
  return _shift_sum(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))), kernel, stride, rate)


def _shift_depthwise_fwd(x, kernel, stride, rate, padding):
  return _shift_depthwise(x, kernel, stride, rate, padding), (x, kernel)


def _shift_depthwise_bwd(stride, rate, padding, residuals, g):
  """Both gradients as sums over the padded input grid, of `g` placed (dilated by the stride) at each
  kernel entry's offset. d x is the transposed conv: a shift-sum of that placement with the flipped
  kernel, cropped. d kernel[i, j] multiplies the padded input by `g` placed at entry (i, j)'s offset
  rather than `g` by a shifted slice of the input: every operand XLA materialises then depends on
  `g`, so none can be computed early in the forward pass and kept alive until here."""
  x, kernel = residuals
  k = kernel.shape[0]
  k_eff = effective_kernel(k, rate)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  hp, wp = xp.shape[1:3]
  out_h, out_w = g.shape[1:3]
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  zero = jnp.zeros((), g.dtype)

  def placed(top: int, left: int, height: int, width: int) -> jax.Array:
    """`g` dilated by the stride, at (top, left) of a zero (height, width) grid."""
    return lax.pad(g, zero, ((0, 0, 0), (top, height - top - span_h, stride - 1),
                             (left, width - left - span_w, stride - 1), (0, 0, 0)))

  d_kernel = jnp.stack([
      jnp.sum(xp * placed(i * rate, j * rate, hp, wp), axis=(0, 1, 2), dtype=jnp.float32)
      for i in range(k) for j in range(k)]).reshape(kernel.shape).astype(kernel.dtype)
  edge = k_eff - 1
  d_xp = _shift_sum(placed(edge, edge, hp + edge, wp + edge), kernel[::-1, ::-1], 1, rate)
  (top, _), (left, _) = padding
  d_x = d_xp[:, top:top + x.shape[1], left:left + x.shape[2]]
  return d_x.astype(x.dtype), d_kernel


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """1x1 conv of NHWC `x` with a (1, 1, C, D) kernel as a matmul over channels (a strided 1x1 conv
  reads every `stride`-th pixel under both SAME and fixed padding). The same numbers as
  `lax.conv_general_dilated`; XLA:CPU runs the matmul faster, forward and backward
  (docs/performance.md), and GPU/TPU compilers turn 1x1 convs into this matmul anyway.

  The matmul is over `x` viewed as (rows, channels): the kernel gradient of a 4-D dot_general
  made XLA:CPU write the cotangent transposed, in a copy slower than the matmul itself; on 2-D
  operands it reads the cotangent in place."""
  if stride > 1:
    x = x[:, ::stride, ::stride]
  y = lax.dot_general(x.reshape(-1, x.shape[-1]), kernel[0, 0], (((1,), (0,)), ((), ())))
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def batch_norm_scale_shift(gamma: jax.Array, beta: jax.Array, mean: jax.Array, var: jax.Array,
                           epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(scale, shift) with BatchNorm(x) = x * scale + shift for these statistics."""
  scale = gamma * lax.rsqrt(var + epsilon)
  return scale, beta - mean * scale


def fold_batch_norm(module: nn.Module, kernel: jax.Array, train: bool,
                    channel_axis: int = -1) -> tuple[jax.Array, jax.Array | None]:
  """(kernel * scale, shift): `module`'s `BatchNorm` child folded into its float32 `kernel`.

  conv(x, kernel * scale) + shift equals BatchNorm(conv(x, kernel)) in inference up to float
  rounding, one pass over the activation fewer. The child's variables are read from `module`'s
  own (the tree is the unfolded model's, so checkpoints load unchanged). Returns (kernel, None)
  unchanged unless `module` has a folded BatchNorm (and is not initialising); `conv_output`
  then applies the BatchNorm child.
  """
  if not (module.use_bn and module.bn.folded) or module.is_initializing():
    return kernel, None
  if train and not module.bn.frozen:
    raise ValueError(f'{module.name}: a folded BatchNorm uses the moving statistics; it is for '
                     'inference (train=False), not training.')
  params = module.variables['params']['BatchNorm']
  stats = module.variables['batch_stats']['BatchNorm']
  scale, shift = batch_norm_scale_shift(params['gamma'], params['beta'], stats['moving_mean'],
                                        stats['moving_variance'], module.bn.epsilon)
  shape = [1] * kernel.ndim
  shape[channel_axis] = scale.shape[0]
  return kernel * scale.reshape(shape), shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, gamma: jax.Array, beta: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BatchNorm over every axis of `x` but the last: (output, batch mean, batch variance),
  statistics in float32.

  The backward pass is written out over `x` viewed as (rows, channels): two column sums and one
  elementwise pass, fewer passes over the activation than autodiff's derivation (a train step ~6%
  faster on XLA:CPU, docs/performance.md).
  """
  return _batch_norm_train_fwd(x, gamma, beta, epsilon)[0]


def _batch_norm_train_fwd(x, gamma, beta, epsilon):
  xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  mean = jnp.mean(xf, 0)
  var = jnp.mean(jnp.square(xf - mean), 0)
  scale, shift = batch_norm_scale_shift(gamma, beta, mean, var, epsilon)
  y = x * scale.astype(x.dtype) + shift.astype(x.dtype)
  return (y, mean, var), (x, gamma, mean, var)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  x, gamma, mean, var = residuals
  g_y, g_mean, g_var = cotangents
  rows = x.size // x.shape[-1]
  rstd = lax.rsqrt(var + epsilon)
  xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  g = g_y.reshape(-1, x.shape[-1]).astype(jnp.float32)
  # Every full-size expression here reads `g`. One that reads only forward values (such as
  # x - mean) is computed by XLA:CPU in the forward pass and kept alive until here: 3 GB more
  # for an Xception-65 step at batch 4.
  d_beta = jnp.sum(g, 0)
  d_gamma = (jnp.sum(g * xf, 0) - mean * d_beta) * rstd  # sum(g * x_hat)
  # x_hat = (x - mean) * rstd and y = gamma * x_hat + beta, with the statistics functions of x:
  # d x = gamma * rstd * (g - (d_beta + x_hat * d_gamma) / rows), plus the statistics' own
  # cotangents (zero unless a caller differentiates them) times d mean / d x = 1 / rows and
  # d var / d x = 2 (x - mean) / rows; as a * g + b * x + c per channel.
  a = gamma * rstd
  b = (2.0 * g_var - a * d_gamma * rstd) / rows
  c = (g_mean - a * d_beta) / rows - b * mean
  d_x = g * a + xf * b + c
  return d_x.reshape(x.shape).astype(x.dtype), d_gamma, d_beta


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
  """TF-slim BatchNorm: params gamma/beta, batch_stats moving_mean/moving_variance.

  Statistics are reduced over every axis but the last. Under `jax.jit` with the batch sharded over a
  mesh, that reduction is over the global batch, i.e. synchronised BatchNorm. The moving variance is
  updated with the Bessel-corrected batch variance, as TF's fused batch norm does.
  """

  config: BatchNormConfig = BatchNormConfig()

  @nn.compact
  def declare(self, channels: int) -> tuple[jax.Array, jax.Array, nn.Variable, nn.Variable]:
    """(gamma, beta, moving mean, moving variance): the variables, for a caller that computes the
    BatchNorm itself (`separable_conv`'s fused unit)."""
    gamma = self.param('gamma', nn.initializers.ones, (channels,), jnp.float32)
    beta = self.param('beta', nn.initializers.zeros, (channels,), jnp.float32)
    moving_mean = self.variable('batch_stats', 'moving_mean', jnp.zeros, (channels,), jnp.float32)
    moving_var = self.variable('batch_stats', 'moving_variance', jnp.ones, (channels,), jnp.float32)
    return gamma, beta, moving_mean, moving_var

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    gamma, beta, moving_mean, moving_var = self.declare(channels)
    if not train or self.config.frozen:
      scale, shift = batch_norm_scale_shift(gamma, beta, moving_mean.value, moving_var.value,
                                            self.config.epsilon)
      return x * scale.astype(x.dtype) + shift.astype(x.dtype)
    axis_name = self.config.axis_name
    if axis_name is None:
      n = x.size // channels
      y, mean, var = batch_norm_train(x, gamma, beta, self.config.epsilon)
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      n = x.size // channels * jax.lax.axis_size(axis_name)
      mean = reductions.ordered_psum(jnp.sum(xf, axes), axis_name) / n
      var = reductions.ordered_psum(jnp.sum(jnp.square(xf - mean), axes), axis_name) / n
      scale, shift = batch_norm_scale_shift(gamma, beta, mean, var, self.config.epsilon)
      y = x * scale.astype(x.dtype) + shift.astype(x.dtype)
    self.update(moving_mean, moving_var, mean, var, n)
    return y

  def update(self, moving_mean: nn.Variable, moving_var: nn.Variable, mean: jax.Array,
             var: jax.Array, n: int) -> None:
    """Moves the moving statistics towards a batch's `mean` and `var` (over `n` values), except
    while initialising."""
    if self.is_initializing():
      return
    decay = self.config.decay
    moving_mean.value = decay * moving_mean.value + (1 - decay) * mean
    moving_var.value = decay * moving_var.value + (1 - decay) * var * (n / max(n - 1, 1))


Activation = Callable[[jax.Array], jax.Array]


def conv_output(module: nn.Module, y: jax.Array, train: bool, bn: BatchNorm | None,
                shift: jax.Array | None) -> jax.Array:
  """A conv layer's tail: the folded BatchNorm's `shift` (see `fold_batch_norm`) or the
  BatchNorm child `bn`, then `module.activation`."""
  if shift is not None:
    y = y + shift.astype(y.dtype)
  elif bn is not None:
    y = bn(y, train)
  return module.activation(y) if module.activation is not None else y


class ConvBN(nn.Module):
  """slim.conv2d with its usual arg scope: conv (`weights`, HWIO) -> BatchNorm -> activation.

  `use_bn=False` drops the BatchNorm (then `use_bias` adds `biases`), `activation=None` the
  activation: `ConvBN(n, use_bn=False, activation=None, use_bias=True)` is a plain conv.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  rate: int = 1
  use_bn: bool = True
  activation: Activation | None = nn.relu
  use_bias: bool = False
  bn: BatchNormConfig = BatchNormConfig()
  explicit_padding: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')

  @nn.compact
  def declare(self, in_channels: int) -> tuple[jax.Array, jax.Array | None, BatchNorm | None]:
    """(kernel, biases or None, BatchNorm child or None), float32 as stored."""
    k = self.kernel_size
    kernel = self.param('weights', self.kernel_init, (k, k, in_channels, self.features),
                        jnp.float32)
    bias = (self.param('biases', nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    return kernel, bias, BatchNorm(self.bn, name='BatchNorm') if self.use_bn else None

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    rate = self.rate if k > 1 else 1
    kernel, bias, bn = self.declare(x.shape[-1])
    kernel, shift = fold_batch_norm(self, kernel, train)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1:
      y = pointwise_conv(x, kernel, self.stride)
    else:
      y = conv(x, kernel, self.stride,
               conv_padding(x.shape, k, self.stride, rate, self.explicit_padding), rate)
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return conv_output(self, y, train, bn, shift)


class DepthwiseConvBN(nn.Module):
  """slim.separable_conv2d without its pointwise part: `depthwise_weights` (k, k, C, 1) ->
  BatchNorm -> activation (either optional, as in `ConvBN`)."""

  kernel_size: int = 3
  stride: int = 1
  rate: int = 1
  use_bn: bool = True
  activation: Activation | None = nn.relu
  bn: BatchNormConfig = BatchNormConfig()
  explicit_padding: bool = True
  impl: DepthwiseImpl = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.truncated_normal(0.33)

  @nn.compact
  def declare(self, channels: int) -> tuple[jax.Array, BatchNorm | None]:
    """(kernel, BatchNorm child or None), float32 as stored."""
    k = self.kernel_size
    kernel = self.param('depthwise_weights', self.kernel_init, (k, k, channels, 1), jnp.float32)
    return kernel, BatchNorm(self.bn, name='BatchNorm') if self.use_bn else None

  def padding(self, shape: Sequence[int]) -> Padding:
    return conv_padding(shape, self.kernel_size, self.stride, self.rate, self.explicit_padding)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kernel, bn = self.declare(x.shape[-1])
    kernel, shift = fold_batch_norm(self, kernel, train, channel_axis=2)
    y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.rate,
                       self.padding(x.shape), self.impl)
    return conv_output(self, y, train, bn, shift)


def _relu_if(x: jax.Array, on: bool) -> jax.Array:
  return jnp.maximum(x, 0) if on else x


@functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(7, 15)))
def separable_unit_train(x: jax.Array, depthwise_kernel: jax.Array, gamma1: jax.Array,
                         beta1: jax.Array, pointwise_kernel: jax.Array, gamma2: jax.Array,
                         beta2: jax.Array, stride: int, rate: int, padding: Padding,
                         impl: DepthwiseImpl, pre_relu: bool, mid_relu: bool, out_relu: bool,
                         epsilon: float) -> tuple[jax.Array, ...]:
  """[ReLU] -> depthwise conv -> BatchNorm -> [ReLU] -> 1x1 conv -> BatchNorm -> [ReLU] in
  training: (output, mean1, var1, mean2, var2), the two BatchNorms' batch statistics.

  The same numbers as composing `depthwise_conv`, `batch_norm_train` and `pointwise_conv`, with the
  backward pass written out for the whole unit: it keeps only the unit's input, the two conv
  outputs and the statistics, and recomputes the pointwise conv's input (a scale, a shift and a
  ReLU of the depthwise output) where autodiff would store it (docs/performance.md).
  """
  return _separable_unit_fwd(x, depthwise_kernel, gamma1, beta1, pointwise_kernel, gamma2, beta2,
                             stride, rate, padding, impl, pre_relu, mid_relu, out_relu, epsilon)[0]


# Name scopes of the fused unit's parts, named like the layers they replace, so that a profile
# (`op_profile`) counts them as the composed layers' are counted.
_DEPTHWISE, _POINTWISE = 'fused_depthwise', 'fused_pointwise'
_DEPTHWISE_BN, _POINTWISE_BN = f'{_DEPTHWISE}/BatchNorm', f'{_POINTWISE}/BatchNorm'


def _separable_unit_fwd(x, depthwise_kernel, gamma1, beta1, pointwise_kernel, gamma2, beta2,
                        stride, rate, padding, impl, pre_relu, mid_relu, out_relu, epsilon):
  r = _relu_if(x, pre_relu)
  with jax.named_scope(_DEPTHWISE):
    d = depthwise_conv(r, depthwise_kernel, stride, rate, padding, impl)
  with jax.named_scope(_DEPTHWISE_BN):
    (y1, mean1, var1), _ = _batch_norm_train_fwd(d, gamma1, beta1, epsilon)
  with jax.named_scope(_POINTWISE):
    p = pointwise_conv(_relu_if(y1, mid_relu), pointwise_kernel)
  with jax.named_scope(_POINTWISE_BN):
    (y2, mean2, var2), _ = _batch_norm_train_fwd(p, gamma2, beta2, epsilon)
  residuals = (x, depthwise_kernel, d, gamma1, beta1, mean1, var1, pointwise_kernel, p, gamma2,
               beta2, mean2, var2)
  return (_relu_if(y2, out_relu), mean1, var1, mean2, var2), residuals


def _separable_unit_bwd(stride, rate, padding, impl, pre_relu, mid_relu, out_relu, epsilon,
                        residuals, cotangents):
  (x, depthwise_kernel, d, gamma1, beta1, mean1, var1, pointwise_kernel, p, gamma2, beta2, mean2,
   var2) = residuals
  g_y, g_mean1, g_var1, g_mean2, g_var2 = cotangents

  def normalized(z, gamma, beta, mean, var, tie=0.0):
    scale, shift = batch_norm_scale_shift(gamma, beta, mean, var, epsilon)
    return z * (scale + tie).astype(z.dtype) + shift.astype(z.dtype)

  with jax.named_scope(_POINTWISE_BN):
    if out_relu:
      g_y = jnp.where(normalized(p, gamma2, beta2, mean2, var2) > 0, g_y, 0)
    g_p, g_gamma2, g_beta2 = _batch_norm_train_bwd(epsilon, (p, gamma2, mean2, var2),
                                                   (g_y, g_mean2, g_var2))
  with jax.named_scope(_DEPTHWISE_BN):
    # The recomputed pointwise input must depend on a backward value (the zero `tie`): otherwise
    # XLA:CPU computes it in the forward pass and keeps it alive until here, as autodiff would.
    y1 = normalized(d, gamma1, beta1, mean1, var1, tie=0.0 * g_beta2[0])
    a1 = _relu_if(y1, mid_relu)
  with jax.named_scope(_POINTWISE):
    rows, channels = a1.size // a1.shape[-1], a1.shape[-1]
    g_p2 = g_p.reshape(rows, -1)
    g_pointwise = lax.dot_general(a1.reshape(rows, channels), g_p2, (((0,), (0,)), ((), ())))
    g_a1 = lax.dot_general(g_p2, pointwise_kernel[0, 0], (((1,), (1,)), ((), ())))
    g_a1 = g_a1.reshape(a1.shape)
  with jax.named_scope(_DEPTHWISE_BN):
    if mid_relu:
      g_a1 = jnp.where(y1 > 0, g_a1, 0)
    g_d, g_gamma1, g_beta1 = _batch_norm_train_bwd(epsilon, (d, gamma1, mean1, var1),
                                                   (g_a1, g_mean1, g_var1))
  with jax.named_scope(_DEPTHWISE):
    _, depthwise_vjp = jax.vjp(lambda r, k: depthwise_conv(r, k, stride, rate, padding, impl),
                               _relu_if(x, pre_relu), depthwise_kernel)
    g_r, g_depthwise = depthwise_vjp(g_d)
  g_x = jnp.where(x > 0, g_r, 0) if pre_relu else g_r
  return (g_x, g_depthwise, g_gamma1, g_beta1,
          g_pointwise[None, None].astype(pointwise_kernel.dtype), g_gamma2, g_beta2)


separable_unit_train.defvjp(_separable_unit_fwd, _separable_unit_bwd)


def separable_conv(x: jax.Array, features: int, name: str, *, train: bool,
                   stride: int = 1, rate: int = 1, activation: Activation | None = nn.relu,
                   pre_activation: Activation | None = None, bn: BatchNormConfig,
                   impl: DepthwiseImpl, dtype: Any, fused: bool | None = None) -> jax.Array:
  """Atrous separable conv as the official `split_separable_conv2d`: [`pre_activation`], then
  `{name}_depthwise` and `{name}_pointwise` 1x1, each with BatchNorm and `activation`, both
  children of the calling compact module.

  In training with batch statistics (no `axis_name`, ReLU or no activations) the unit runs as the
  one op `separable_unit_train`, less memory for the same numbers; `fused=False` forces the
  composed layers, `fused=True` requires the fused op.
  """
  depthwise = DepthwiseConvBN(stride=stride, rate=rate, activation=activation, bn=bn, impl=impl,
                              dtype=dtype, name=f'{name}_depthwise')
  pointwise = ConvBN(features, 1, activation=activation, bn=bn, dtype=dtype,
                     name=f'{name}_pointwise')
  fusable = (train and not bn.frozen and not bn.folded and bn.axis_name is None
             and activation in (nn.relu, None) and pre_activation in (nn.relu, None))
  if fused and not fusable:
    raise ValueError(f'{name}: the fused separable unit is for training with batch statistics '
                     '(no axis_name, not frozen or folded) and ReLU or no activations; use '
                     'fused=None to pick the composed layers here.')
  if not (fusable if fused is None else fused):
    if pre_activation is not None:
      x = pre_activation(x)
    return pointwise(depthwise(x, train), train)
  x = x.astype(dtype)
  depthwise_kernel, bn1 = depthwise.declare(x.shape[-1])
  gamma1, beta1, moving_mean1, moving_var1 = bn1.declare(x.shape[-1])
  pointwise_kernel, _, bn2 = pointwise.declare(x.shape[-1])
  gamma2, beta2, moving_mean2, moving_var2 = bn2.declare(features)
  with jax.named_scope(name):
    y, mean1, var1, mean2, var2 = separable_unit_train(
        x, depthwise_kernel.astype(dtype), gamma1, beta1, pointwise_kernel.astype(dtype), gamma2,
        beta2, stride, rate, depthwise.padding(x.shape), impl, pre_activation is not None,
        activation is not None, activation is not None, bn.epsilon)
  rows = y.size // features  # The pointwise conv keeps the depthwise output's pixels.
  bn1.update(moving_mean1, moving_var1, mean1, var1, rows)
  bn2.update(moving_mean2, moving_var2, mean2, var2, rows)
  return y


@functools.lru_cache(maxsize=256)
def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of 1-D linear interpolation with TF's align_corners=True semantics."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def _symbolic_interpolation_matrix(in_size: Any, out_size: Any, dtype: Any) -> jax.Array:
  """`_interpolation_matrix` for symbolic sizes, built from iotas in integer arithmetic:
  source position o * (in - 1) / (out - 1) = lo + r / (out - 1), so the weights are the numpy
  matrix's up to float32 rounding."""
  rows = lax.broadcasted_iota(jnp.int32, (out_size, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (1, in_size), 1)
  span_in = jnp.asarray(in_size, jnp.int32) - 1
  span_out = jnp.maximum(jnp.asarray(out_size, jnp.int32) - 1, 1)
  numerator = rows * span_in
  lo = numerator // span_out
  frac = (numerator - lo * span_out).astype(jnp.float32) / span_out.astype(jnp.float32)
  hi = jnp.minimum(lo + 1, span_in)
  m = jnp.where(cols == lo, 1.0 - frac, 0.0) + jnp.where(cols == hi, frac, 0.0)
  return m.astype(dtype)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of NHWC `x` to `size` (h, w) with align_corners=True, as the official code.

  Sizes may be symbolic (a shape-polymorphic `jax.export`): the interpolation matrices are then
  computed in the program instead of with numpy.
  """
  symbolic = is_symbolic(*x.shape[1:3], *size[:2])
  out_h, out_w = (size[0], size[1]) if symbolic else (int(size[0]), int(size[1]))
  if tuple(x.shape[1:3]) == (out_h, out_w):  # Symbolic dims compare equal when provably so.
    return x
  with jax.named_scope(RESIZE_SCOPE):
    if symbolic:
      mh = _symbolic_interpolation_matrix(x.shape[1], out_h, x.dtype)
      mw = _symbolic_interpolation_matrix(x.shape[2], out_w, x.dtype)
    else:
      mh = jnp.asarray(_interpolation_matrix(x.shape[1], out_h), x.dtype)
      mw = jnp.asarray(_interpolation_matrix(x.shape[2], out_w), x.dtype)
    hp = lax.Precision.HIGHEST
    y = jnp.einsum('oh,nhwc->nowc', mh, x, precision=hp)
    return jnp.einsum('pw,nowc->nopc', mw, y, precision=hp)


def max_pool_same(x: jax.Array, window: int, stride: int) -> jax.Array:
  """slim.max_pool2d with padding='SAME'."""
  pads = ((0, 0), same_padding(x.shape[1], window, stride, 1),
          same_padding(x.shape[2], window, stride, 1), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           pads)


def atrous_plan(unit_strides: Sequence[Sequence[int]], output_stride: int,
                root_stride: int) -> list[list[tuple[int, int]]]:
  """(stride, rate) of every unit, as TF-slim's `stack_blocks_dense` assigns them.

  Units run at their own stride until the feature map reaches `output_stride`; from then on they run
  at stride 1 and the atrous rate grows by each skipped stride, so the same weights serve any output
  stride.
  """
  current, rate = root_stride, 1
  plan = []
  for block in unit_strides:
    block_plan = []
    for stride in block:
      if current == output_stride:
        block_plan.append((1, rate))
        rate *= stride
      else:
        if current > output_stride:
          raise ValueError(f'output_stride {output_stride} cannot be reached by this backbone.')
        block_plan.append((stride, 1))
        current *= stride
    plan.append(block_plan)
  if current != output_stride:
    raise ValueError(f'output_stride {output_stride} cannot be reached by this backbone '
                     f'(its plain output stride is {current}); use 8, 16 or 32.')
  return plan


def scaled_depth(depth: int, multiplier: float) -> int:
  return max(1, int(round(depth * multiplier)))
