"""What the backbones share: the TF-slim `blockN/unit_M/<module>` scopes and what they return.

A backbone returns `Features`: `by_stride[s]`, the last output at stride s (so
`by_stride[output_stride]` is the backbone output), and `decoder`, the stride-4 feature the
official v3+ decoder takes, which is not always the last one at stride 4.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax


class Features(NamedTuple):
  """A backbone's outputs: the last feature at each stride, and the decoder's end point."""

  by_stride: dict[int, jax.Array]
  decoder: jax.Array


class Unit(nn.Module):
  """The `unit_N` scope holding one `module_cls(**fields)` named `module_name`, optionally
  rematerialised (recomputed in the backward pass instead of stored)."""

  module_cls: type[nn.Module]
  module_name: str
  fields: dict[str, Any]
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Any:
    cls = nn.remat(self.module_cls, static_argnums=(2,)) if self.remat else self.module_cls
    return cls(**self.fields, name=self.module_name)(x, train)


class Block(nn.Module):
  """The `blockN` scope: units `unit_1..` in order, each returning (output, extra); returns the list
  of every unit's (output, extra)."""

  module_cls: type[nn.Module]
  module_name: str
  units: tuple[dict[str, Any], ...]
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[tuple[jax.Array, jax.Array]]:
    outputs = []
    for i, fields in enumerate(self.units):
      x, extra = Unit(self.module_cls, self.module_name, fields, self.remat,
                      name=f'unit_{i + 1}')(x, train)
      outputs.append((x, extra))
    return outputs
