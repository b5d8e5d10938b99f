"""The per-op-class breakdown's HLO classification (profiled tiny steps: tests/test_benchmark.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeplab_jax import op_profile

HLO = """HloModule jit_step

%fused_dot (param_0: f32[8,4], param_1: f32[4,2]) -> f32[8,2] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/net/conv_pointwise/dot_general"}
}

%fused_bn (param_0.1: f32[8,2]) -> f32[8,2] {
  %param_0.1 = f32[8,2]{1,0} parameter(0)
  ROOT %multiply.2 = f32[8,2]{1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(step)/net/conv_pointwise/BatchNorm/mul"}
}

%fused_taps (param_0.2: f32[8,2]) -> f32[8,2] {
  %param_0.2 = f32[8,2]{1,0} parameter(0)
  ROOT %add.3 = f32[8,2]{1,0} add(%param_0.2, %param_0.2), metadata={op_name="jit(step)/net/conv_depthwise/add"}
}

%fused_transpose (param_0.3: f32[8,2]) -> f32[2,8] {
  %param_0.3 = f32[8,2]{1,0} parameter(0)
  ROOT %transpose.4 = f32[2,8]{0,1} transpose(%param_0.3), dimensions={1,0}
}

%body (p: (s32[], f32[8,2])) -> (s32[], f32[8,2]) {
  %p = (s32[], f32[8,2]{1,0}) parameter(0)
  ROOT %tuple.9 = (s32[], f32[8,2]{1,0}) tuple(%p)
}

ENTRY %main (a: f32[8,4], b: f32[4,2], k: f32[1,3,3,2]) -> f32[8,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %k = f32[3,3,1,2]{3,2,1,0} parameter(2)
  %mm = f32[8,2]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/net/conv_pointwise/dot_general"}
  %bn = f32[8,2]{1,0} fusion(%mm), kind=kLoop, calls=%fused_bn, metadata={op_name="jit(step)/net/conv_pointwise/BatchNorm/mul"}
  %taps = f32[8,2]{1,0} fusion(%bn), kind=kLoop, calls=%fused_taps, metadata={op_name="jit(step)/net/conv_depthwise/add"}
  %grouped = f32[1,4,4,2]{3,2,1,0} convolution(%x, %k), window={size=3x3}, dim_labels=b01f_01io->b01f, feature_group_count=2, metadata={op_name="jit(step)/net/conv_depthwise/conv_general_dilated"}
  %dense = f32[1,4,4,2]{3,2,1,0} convolution(%x, %k), window={size=3x3}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/net/conv1/conv_general_dilated"}
  %layout = f32[2,8]{0,1} fusion(%taps), kind=kLoop, calls=%fused_transpose
  %copy.5 = f32[8,2]{0,1} copy(%taps)
  %relu = f32[8,2]{1,0} maximum(%taps, %taps), metadata={op_name="jit(step)/net/relu"}
  %loop = (s32[], f32[8,2]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,2]{1,0} add(%relu, %relu)
}
"""


def test_classify_by_opcode_fusion_contents_and_layer_names():
  classes = op_profile.classify(HLO)
  assert classes['mm'] == classes['dot.1'] == classes['dense'] == 'matmul'
  assert classes['grouped'] == classes['taps'] == 'depthwise'
  assert classes['bn'] == 'batchnorm'
  assert classes['layout'] == classes['copy.5'] == 'copy'
  assert classes['relu'] == classes['out'] == 'other'
  instructions, computations = op_profile.parse_hlo(HLO)
  assert instructions['loop'].opcode == 'while' and 'body' in instructions['loop'].calls
  assert computations['main'][-1] == 'out' and len(computations) == 6


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (2, 1), [(1, 2), (0, 1)], rhs_dilation=(1, 2),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _net(x, w_conv, w_dense, w_grouped):
  """A strided, padded, dilated dense conv, a grouped conv (not a matmul) and a batched dot."""
  y = _conv(x, w_conv)  # (2, 5, 4, 6): H (9 + 3 - 3) / 2 + 1, W 7 + 1 - 5 + 1.
  y = jax.lax.conv_general_dilated(y, w_grouped, (1, 1), 'SAME', feature_group_count=6,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.einsum('bhwc,bcd->bhwd', y, w_dense)  # A dot with a batch dim.


def _operands():
  keys = jax.random.split(jax.random.key(0), 4)
  return (jax.random.normal(keys[0], (2, 9, 7, 3)), jax.random.normal(keys[1], (3, 3, 3, 6)),
          jax.random.normal(keys[2], (2, 6, 4)), jax.random.normal(keys[3], (3, 3, 1, 6)))


def test_dense_ops_find_the_matmuls_and_count_their_flops():
  args = _operands()
  ops = op_profile.dense_ops(jax.jit(_net).lower(*args).compile().as_text())
  by_opcode = {op.opcode: op for op in ops}
  assert sorted(by_opcode) == ['convolution', 'dot'] and len(ops) == 2  # Not the grouped conv.
  conv, dot = by_opcode['convolution'], by_opcode['dot']
  # Hand counts: output elements times the multiply-adds of each, times 2.
  assert conv.out == (2, 5, 4, 6) and conv.flops == 2 * (2 * 5 * 4 * 6) * (3 * 3 * 3)
  assert dot.flops == 2 * (2 * 5 * 4 * 4) * 6 and dot.count == conv.count == 1
  # The conv rebuilt from the HLO's window and dim_labels computes what the model's conv computes.
  np.testing.assert_allclose(op_profile.rebuild(conv)(args[0], args[1]), _conv(args[0], args[1]),
                             rtol=1e-6, atol=1e-5)


def test_dense_ops_of_a_backward_pass_and_their_floor():
  """The gradient of a dot with respect to both operands adds two matmuls of the same FLOPs, and
  the kernel gradient of a conv is a convolution whose rebuilt shape matches the module's."""
  x, w = jax.random.normal(jax.random.key(1), (64, 32)), jax.random.normal(jax.random.key(2),
                                                                          (32, 16))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1)))
  ops = op_profile.dense_ops(grad.lower(x, w).compile().as_text())
  assert sum(op.flops * op.count for op in ops) == 3 * 2 * 64 * 32 * 16
  args = _operands()
  conv_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w) ** 2), argnums=(0, 1)))
  conv_ops = op_profile.dense_ops(conv_grad.lower(*args[:2]).compile().as_text())
  assert len(conv_ops) >= 3  # Forward, input gradient, kernel gradient (as convs or dots).
  floor = op_profile.matmul_floor(ops + conv_ops, repeats=2, top=3)
  assert floor['matmul_flops'] == sum(op.flops * op.count for op in ops + conv_ops)
  assert floor['dense_op_count'] == sum(op.count for op in ops + conv_ops)
  assert floor['matmul_floor_s'] > 0
  assert floor['matmul_floor_flops_per_s'] == pytest.approx(
      floor['matmul_flops'] / floor['matmul_floor_s'])
  rows = floor['slowest_dense_ops']
  assert len(rows) == 3 and [r[5] for r in rows] == sorted((r[5] for r in rows), reverse=True)


def test_dense_ops_need_an_entry_computation():
  with pytest.raises(ValueError, match='ENTRY'):
    op_profile.dense_ops(HLO.replace('ENTRY ', ''))
