"""The benchmark's per-op-class breakdown: HLO classification and a profiled tiny train step."""

from __future__ import annotations

import math

import pytest
from test_benchmark import tiny_config

from deeplab_jax import op_profile
from deeplab_jax.tools import benchmark

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


def check_breakdown(result: dict) -> None:
  assert set(result['op_time_s']) == set(op_profile.CLASSES)
  assert all(v >= 0 for v in result['op_time_s'].values())
  assert sum(result['op_time_s'].values()) == pytest.approx(result['op_time_total_s'])
  assert sum(result['op_fractions'].values()) == pytest.approx(1.0)
  assert result['op_time_s']['matmul'] > 0 and result['op_time_s']['batchnorm'] > 0
  seconds = [s for _, _, s, _ in result['top_ops']]
  assert seconds == sorted(seconds, reverse=True) and math.isfinite(seconds[0])
  assert all(cls in op_profile.CLASSES for _, cls, _, _ in result['top_ops'])


def test_benchmark_prints_the_breakdown_of_a_train_step():
  config = tiny_config()
  config.model.depthwise_impl = 'shift'
  result = benchmark.benchmark(config, 'train', steps=1, matmul_size=64)
  check_breakdown(result)
  assert result['op_time_s']['depthwise'] > 0  # The shift-and-add taps, named by their layer.


def test_grouped_depthwise_convolutions_are_depthwise():
  config = tiny_config()
  config.model.depthwise_impl = 'grouped'
  prepared = benchmark.prepare(config, 'infer', 1)
  prepared.call()
  result = op_profile.breakdown(prepared.compiled, prepared.call)
  check_breakdown(result)
  assert result['op_time_s']['depthwise'] > 0  # The grouped convolutions.
