"""The per-op-class breakdown's HLO classification (profiled tiny steps: tests/test_benchmark.py)."""

from __future__ import annotations

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
