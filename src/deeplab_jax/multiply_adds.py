"""Count a model's multiply-adds (the paper's "FLOPs"), from the traced jaxpr of its own ops.

`count(config)` returns (and `python -m deeplab_jax.tools.flops --config=CONFIG` prints):
- `multiply_adds`: conv and dense multiply-adds of the model's own ops at the eval crop, read off the
  traced jaxpr (bilinear resizes, BN and pooling are not multiply-adds here, as in the paper);
- `multiply_adds_tf`: the same network counted as the paper's TF profiler counted it: TF computes an
  atrous conv through space_to_batch, so a conv at rate r costs as if its output grid were padded up to
  a multiple of r in each spatial dim;
- `params`: the number of parameters;
and the settings counted (backbone, output strides, crop, scales, flip). Eval scales and flip multiply
the cost as the evaluator runs them: one forward pass per scale (per flip) at the scaled crop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jcore

from deeplab_jax import models
from deeplab_jax.config import eval_output_stride
from deeplab_jax.inference import scaled_size
from deeplab_jax.models import layers


def _sub_jaxprs(params: dict) -> Iterator[jcore.Jaxpr]:
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def _eqns(jaxpr: jcore.Jaxpr) -> Iterator[jcore.JaxprEqn]:
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _sub_jaxprs(eqn.params):
      yield from _eqns(sub)


def _conv_macs(eqn: jcore.JaxprEqn, tf_grid: bool) -> int:
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
  kernel_spatial = [rhs.shape[d] for d in rhs_spec[2:]]
  in_per_group = rhs.shape[rhs_spec[1]]
  out_spatial = [out.shape[d] for d in out_spec[2:]]
  if tf_grid:
    dilation = eqn.params['rhs_dilation']
    out_spatial = [math.ceil(o / r) * r if (r > 1 and k > 1) else o
                   for o, r, k in zip(out_spatial, dilation, kernel_spatial, strict=True)]
  del lhs
  return (out.shape[out_spec[0]] * out.shape[out_spec[1]] * math.prod(out_spatial)
          * math.prod(kernel_spatial) * in_per_group)


def _dot_macs(eqn: jcore.JaxprEqn) -> int:
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def count_jaxpr(jaxpr: jcore.Jaxpr) -> tuple[int, int]:
  """(native, TF space_to_batch) multiply-adds of the convs and matmuls in `jaxpr`."""
  native = tf = 0
  for eqn in _eqns(jaxpr):
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      native += _conv_macs(eqn, tf_grid=False)
      tf += _conv_macs(eqn, tf_grid=True)
    elif name == 'dot_general' and layers.RESIZE_SCOPE not in str(eqn.source_info.name_stack):
      macs = _dot_macs(eqn)
      native += macs
      tf += macs
  return native, tf


def count(config: ml_collections.ConfigDict, crop_size: Sequence[int] | None = None
          ) -> dict[str, Any]:
  """Multiply-adds and parameters of `config`'s model at its eval settings, batch 1."""
  eval_os = eval_output_stride(config)
  crop = tuple(crop_size or config.eval.crop_size)
  scales = tuple(config.eval.scales)
  flip = bool(config.eval.flip)
  model = models.build_model(config.model, eval_os, depthwise_impl='grouped')
  shape = jax.ShapeDtypeStruct((1, crop[0], crop[1], 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), shape)
  params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(variables['params']))
  native = tf = 0
  for scale in scales:
    x = jax.ShapeDtypeStruct((1, *scaled_size(crop, scale), 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr
    n, t = count_jaxpr(jaxpr)
    native += n * (2 if flip else 1)
    tf += t * (2 if flip else 1)
  return {
      'backbone': config.model.backbone,
      'train_output_stride': config.model.output_stride,
      'eval_output_stride': eval_os,
      'decoder': bool(config.model.decoder),
      'aspp_separable': bool(config.model.aspp_separable),
      'decoder_separable': bool(config.model.decoder_separable),
      'crop_size': list(crop),
      'scales': list(scales),
      'flip': flip,
      'multiply_adds': native,
      'multiply_adds_tf': tf,
      'params': params,
  }
