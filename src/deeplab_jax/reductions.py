"""Cross-device sums in a fixed order, for a train step that is bit-identical in any process layout.

XLA's all-reduce adds the devices' partial sums in an order of its own choosing: one process with 4
devices, 2 processes x 2 (gloo) and a GPU/TPU collective each add them differently, and float32
rounding then makes runs on the same devices differ in the last bits (which training amplifies).
Here a sum over the devices of a mesh axis is made of data movement, which is exact, and one local
sum: every device sends chunk i of its value to device i (`all_to_all`), device i adds the chunks it
received in device order, and the sums are gathered back (`all_gather`). The same number of devices
therefore gives the same bits whatever the number of processes, at the bandwidth of a
reduce-scatter + all-gather (what a ring all-reduce moves).

These functions run inside `jax.shard_map(..., check_vma=False)` over `axis_name`, where each
device holds its own (local) values and its own gradients. Their backward passes keep to one rule:
the cotangent a device gets for a local value is the derivative of the *global* loss with respect to
it, so a device's parameter gradient is its share of the global gradient and `ordered_psum` of the
shares is the global gradient (see `train_state.train_step`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def _ordered_sum(tree: Any, axis_name: str) -> Any:
  flat, unravel = ravel_pytree(tree)
  devices = jax.lax.axis_size(axis_name)
  if devices == 1:
    return tree
  size = flat.shape[0]
  chunk = -(-size // devices)
  flat = jnp.pad(flat, (0, chunk * devices - size)).reshape(devices, chunk)
  received = jax.lax.all_to_all(flat, axis_name, split_axis=0, concat_axis=0)  # [device, chunk]
  summed = jnp.sum(received, axis=0)  # One local reduce: the same order on every layout.
  return unravel(jax.lax.all_gather(summed, axis_name, tiled=True)[:size])


_custom_vjp = functools.partial(jax.custom_vjp, nondiff_argnums=(1,))


def _ordered_sum_op(backward: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
  """`_ordered_sum` whose backward pass maps the cotangent with `backward(cotangent, axis_name)`."""

  @_custom_vjp
  def op(tree: Any, axis_name: str) -> Any:
    return _ordered_sum(tree, axis_name)

  op.defvjp(lambda tree, axis_name: (_ordered_sum(tree, axis_name), None),
            lambda axis_name, _, cotangent: (backward(cotangent, axis_name),))
  return op


# Every device used the sum in its own local computation: the global derivative with respect to
# each term is the sum of all devices' cotangents.
_psum_local = _ordered_sum_op(_ordered_sum)
# Every device computes the same global loss from the total: its cotangent already is the global
# derivative, the same for each device's term.
_total = _ordered_sum_op(lambda cotangent, axis_name: cotangent)


def ordered_psum(tree: Any, axis_name: str) -> Any:
  """The sum over the devices of `axis_name` of each leaf of `tree`, added in device order, for use
  in every device's local computation (BatchNorm statistics) and as the sum of gradient shares."""
  return _psum_local(tree, axis_name)


def ordered_total(tree: Any, axis_name: str) -> Any:
  """`ordered_psum` for a total that every device turns into the same global loss (the loss's sum
  over the global batch): each device's term gets the loss's cotangent unchanged."""
  return _total(tree, axis_name)


@_custom_vjp
def _gather(x: jax.Array, axis_name: str) -> jax.Array:
  return jax.lax.all_gather(x, axis_name, tiled=True)


def _gather_fwd(x: jax.Array, axis_name: str) -> tuple[jax.Array, None]:
  return jax.lax.all_gather(x, axis_name, tiled=True), None


def _gather_bwd(axis_name: str, _: None, cotangent: jax.Array) -> tuple[jax.Array]:
  rows = cotangent.shape[0] // jax.lax.axis_size(axis_name)
  start = jax.lax.axis_index(axis_name) * rows
  return (jax.lax.dynamic_slice_in_dim(cotangent, start, rows),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_rows(x: jax.Array, axis_name: str) -> jax.Array:
  """Every device's `x` stacked along axis 0 in device order (the global batch's rows), for a
  global loss that every device computes alike (hard-pixel mining's top-k over the whole batch):
  each device's rows get their part of the loss's cotangent."""
  return _gather(x, axis_name)
