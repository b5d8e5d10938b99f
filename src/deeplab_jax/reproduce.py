"""Check a checkpoint against the mIoU its config should reach: evaluate, compare, tabulate.

`reproduce(config, workdir)` evaluates the checkpoint of `workdir` exactly as `--mode=eval` does
(with the config's eval setting: output stride, scales, flip, mode) and compares the mIoU with the
expected figure: `expected_miou`, else `config.eval.expected_miou` (each `configs/*.py` sets the
published figure of its own setting and lists the others in its docstring). It passes when the two
are within `tolerance` (absolute, in mIoU: 0.01 is one point). The table shows ours against the
reference for the mIoU and, where the reference has them (`config.eval.expected_per_class_iou`, in
class order), per class. `python -m deeplab_jax.tools.reproduce` prints it and exits with status 1
when the check fails.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from deeplab_jax import evaluate
from deeplab_jax.errors import ConfigError

DEFAULT_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The outcome of a reproduction check: `ok`, the printable `table` and the eval `result`."""

  ok: bool
  table: str
  result: dict[str, Any]


def _cell(value: float | None) -> str:
  return '-' if value is None else f'{value:.4f}'


def _diff(ours: float | None, reference: float | None) -> str:
  return '-' if ours is None or reference is None else f'{ours - reference:+.4f}'


def compare(result: Mapping[str, Any], expected_miou: float, tolerance: float,
            expected_per_class: Sequence[float] | None = None, title: str = '') -> Comparison:
  """Compare an eval `result` (`evaluate.Evaluator`'s dict) with the reference figures."""
  ok = abs(result['miou'] - expected_miou) <= tolerance
  names = list(result['per_class_iou'])
  if expected_per_class is not None and len(expected_per_class) != len(names):
    raise ConfigError(f'config.eval.expected_per_class_iou has {len(expected_per_class)} entries '
                      f'for {len(names)} classes; give one per class, in class order, or None.')
  width = max(12, *(len(n) for n in names))
  setting = (f"split {result.get('split')}, step {result['step']}, output stride "
             f"{result.get('output_stride')}, scales {tuple(result.get('scales', ()))}, flip "
             f"{result.get('flip')}, mode {result.get('mode', 'whole')}")
  lines = [title or 'Reproduction check', setting,
           f"{'':<{width}}  {'ours':>8}  {'reference':>9}  {'diff':>8}",
           f"{'mIoU':<{width}}  {_cell(result['miou']):>8}  {_cell(expected_miou):>9}  "
           f"{_diff(result['miou'], expected_miou):>8}"]
  for i, name in enumerate(names):
    ours = result['per_class_iou'][name]
    reference = None if expected_per_class is None else float(expected_per_class[i])
    lines.append(f'{name:<{width}}  {_cell(ours):>8}  {_cell(reference):>9}  '
                 f'{_diff(ours, reference):>8}')
  verdict = 'within' if ok else 'OUTSIDE'
  lines.append(f"{'PASS' if ok else 'FAIL'}: mIoU {result['miou']:.4f} is {verdict} "
               f'{tolerance:.4f} of the reference {expected_miou:.4f}.')
  return Comparison(ok, '\n'.join(lines), dict(result))


def reproduce(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              expected_miou: float | None = None, tolerance: float = DEFAULT_TOLERANCE, *,
              create_eval_iterator: evaluate.EvalIteratorFn | None = None,
              title: str = '') -> Comparison:
  """Evaluate the checkpoint of `workdir` with `config` and compare it with the expected mIoU
  (`expected_miou`, else `config.eval.expected_miou`)."""
  expected = config.eval.expected_miou if expected_miou is None else float(expected_miou)
  if expected is None:
    raise ConfigError('No expected mIoU: pass --expect=MIOU (e.g. 0.822) or set '
                      'config.eval.expected_miou in the config.')
  if not tolerance >= 0:
    raise ConfigError(f'--tolerance={tolerance} must be >= 0 (absolute, in mIoU).')
  result = evaluate.evaluate_checkpoint(config, workdir, create_eval_iterator=create_eval_iterator)
  per_class = config.eval.expected_per_class_iou if expected_miou is None else None
  return compare(result, expected, tolerance, per_class, title)


if __name__ == '__main__':  # `python -m deeplab_jax.reproduce` = `python -m deeplab_jax.tools.reproduce`.
  from deeplab_jax.tools.reproduce import run

  run()
