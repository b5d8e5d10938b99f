"""The official optimizer: SGD with momentum, "poly" learning rate, L2 weight decay on conv weights.

Weight decay follows the official slim arg scopes: an L2 regulariser `wd * ||w||^2 / 2` on every conv
kernel called `weights` (backbone, ASPP, decoder and logits), none on `depthwise_weights`, `biases` or
BatchNorm `gamma`/`beta`. Its gradient `wd * w` is added to the loss gradient before momentum
(`optax.add_decayed_weights` with a mask), exactly as a regularisation loss would.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from deeplab_jax import models
from deeplab_jax.errors import ConfigError

WARMUP_MODES = ('linear', 'constant')


def learning_rate_schedule(optim_config: ml_collections.ConfigDict,
                           num_steps: int) -> optax.Schedule:
  """`base_lr * (1 - step / num_steps) ** power` down to `end_lr`, with an optional warm-up.

  During the first `warmup_steps` the rate ramps linearly from `warmup_lr` to `base_lr`
  (`warmup_mode='linear'`) or stays at `warmup_lr` (`'constant'`: the official "slow start"). The
  poly decay counts from step 0 in both cases, as the official code does.
  """
  o = optim_config
  poly = optax.polynomial_schedule(init_value=o.base_lr, end_value=o.end_lr, power=o.power,
                                   transition_steps=max(int(num_steps), 1))
  warmup_steps = int(o.warmup_steps)
  if warmup_steps <= 0:
    return poly
  mode = o.warmup_mode
  if mode not in WARMUP_MODES:
    raise ConfigError(f'config.optim.warmup_mode={mode!r}; use one of {WARMUP_MODES}.')
  warmup_lr = float(o.warmup_lr)

  def schedule(step: jax.Array) -> jax.Array:
    if mode == 'linear':
      warm = warmup_lr + (o.base_lr - warmup_lr) * jnp.minimum(step / warmup_steps, 1.0)
    else:
      warm = jnp.asarray(warmup_lr, jnp.float32)
    return jnp.where(step < warmup_steps, warm, poly(step))

  return schedule


def _paths(params: Any) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(params)


def weight_decay_mask(params: Any) -> Any:
  """True for conv kernels named `weights` (the official L2-regularised variables), else False."""
  flat = _paths(params)
  return traverse_util.unflatten_dict({k: k[-1] == 'weights' for k in flat})


def frozen_bn_mask(params: Any, backbone: str) -> Any:
  """True for the backbone's BatchNorm `gamma`/`beta` (held fixed with `freeze_backbone_bn`)."""
  scope = models.backbone_scope(backbone)
  flat = _paths(params)
  return traverse_util.unflatten_dict({
      k: k[0] == scope and len(k) >= 2 and k[-2] == 'BatchNorm' and k[-1] in ('gamma', 'beta')
      for k in flat})


def create_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  """Clip (optional) -> L2 decay on `weights` -> SGD momentum at the poly rate -> frozen BN params.

  `params` only provides the tree structure for the masks.
  """
  o = config.optim
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.weight_decay:
    parts.append(optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(params)))
  parts.append(optax.sgd(learning_rate_schedule(o, config.train.num_steps), momentum=o.momentum))
  if config.model.freeze_backbone_bn:
    # Frozen BatchNorm: the statistics are not updated (the model uses the moving averages) and the
    # affine gamma/beta are held fixed too, so the layer is a constant per-channel transform.
    parts.append(optax.masked(optax.set_to_zero(), frozen_bn_mask(params, config.model.backbone)))
  return optax.chain(*parts)
