"""Memoisation of what is expensive to build once per process: traced and compiled programs.

Configs are not hashable, so `keyed_cache` memoises by a key function of the arguments
(`config_key` turns configs into stable strings). A notebook or a resumed run in the same process
then traces and compiles nothing again, and the least recently used entries are dropped beyond
`maxsize` so that sweeping many configs does not keep every program alive.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import ml_collections

F = TypeVar('F', bound=Callable[..., Any])


def config_key(*configs: ml_collections.ConfigDict) -> str:
  """A stable string of `configs` (sorted JSON), equal for equal field values."""
  return '\n'.join(c.to_json_best_effort(sort_keys=True) for c in configs)


def keyed_cache(maxsize: int, key: Callable[..., Hashable]) -> Callable[[F], F]:
  """Decorator: memoise a function on `key(*args, **kwargs)`, keeping the `maxsize` most recent."""

  def decorate(fn: F) -> F:
    entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

    @functools.wraps(fn)
    def cached(*args, **kwargs):
      k = key(*args, **kwargs)
      if k in entries:
        entries.move_to_end(k)
        return entries[k]
      value = fn(*args, **kwargs)
      entries[k] = value
      while len(entries) > maxsize:
        entries.popitem(last=False)
      return value

    cached.cache_clear = entries.clear  # type: ignore[attr-defined]
    return cached  # type: ignore[return-value]

  return decorate
