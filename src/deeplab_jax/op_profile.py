"""Where a compiled step's time goes: per-op-class time from a profiled run of the step.

`breakdown(compiled, call)` runs `call` once under `jax.profiler`, reads the trace's per-instruction
events (the XLA:CPU thunk runtime and the GPU/TPU runtimes name each event after the HLO
instruction it ran, in the `hlo_op` stat) and classifies each instruction of `compiled`'s HLO:

- `matmul`: a dot or a dense convolution, or a fusion that contains one (1x1 convs are matmuls here,
  3x3 full convs are convolutions);
- `depthwise`: a grouped convolution, or any other instruction made by a `*_depthwise` layer
  outside its BatchNorm (the shift-and-add taps of `layers._shift_depthwise`);
- `batchnorm`: instructions made by a `BatchNorm` layer, forward or backward;
- `copy`: layout copies and transposes (no arithmetic, only memory traffic);
- `other`: everything else (activations, resizes, the loss, the optimizer update, ...).

Each event is one instruction's duration as the runtime recorded it (an instruction that itself
runs on several cores counts once); instructions the runtime runs concurrently both count, so the
total can exceed the step's wall time. `op_fractions` are each class's share of the total.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import jax

CLASSES = ('matmul', 'depthwise', 'batchnorm', 'copy', 'other')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$')
_OPCODE = re.compile(r'[\]\})]\s+([a-z][\w\-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GROUPS = re.compile(r'feature_group_count=(\d+)')
# Instructions whose events enclose other instructions' events (counted by those).
_CONTAINERS = frozenset({'while', 'conditional', 'call', 'async-start', 'async-done'})


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  op_name: str
  calls: tuple[str, ...]
  grouped: bool


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
  """(instructions by name, instruction names by computation) of an HLO module's text."""
  instructions: dict[str, Instruction] = {}
  computations: dict[str, list[str]] = {}
  current: list[str] | None = None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, rest = match.groups()
      opcode = _OPCODE.search(rest)
      op_name = _OP_NAME.search(rest)
      groups = _GROUPS.search(rest)
      instructions[name] = Instruction(
          opcode=opcode.group(1) if opcode else '', op_name=op_name.group(1) if op_name else '',
          calls=tuple(_CALLS.findall(rest)), grouped=bool(groups and int(groups.group(1)) > 1))
      current.append(name)
      continue
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
  return instructions, computations


def classify(text: str) -> dict[str, str]:
  """{instruction name: class} for every instruction of the HLO module `text`."""
  return _classes(*parse_hlo(text))


def _classes(instructions: dict[str, Instruction],
             computations: dict[str, list[str]]) -> dict[str, str]:
  """`classify` of a parsed module (`parse_hlo`)."""

  def contents(name: str, seen: set[str]) -> Iterable[Instruction]:
    inst = instructions[name]
    yield inst
    for computation in inst.calls:
      if computation not in seen:
        seen.add(computation)
        for child in computations.get(computation, ()):
          yield from contents(child, seen)

  classes = {}
  for name, inst in instructions.items():
    inner = list(contents(name, set())) if inst.opcode == 'fusion' else [inst]
    op_names = [i.op_name for i in inner if i.op_name] or [inst.op_name]
    convs = [i for i in inner if i.opcode == 'convolution']
    if any(i.opcode == 'dot' for i in inner) or any(not c.grouped for c in convs):
      cls = 'matmul'
    elif convs:
      cls = 'depthwise'
    elif any('/BatchNorm' in n for n in op_names):
      cls = 'batchnorm'
    elif any('_depthwise' in n for n in op_names):
      cls = 'depthwise'
    elif inst.opcode in ('copy', 'transpose') or (
        inst.opcode == 'fusion' and all(i.opcode in ('copy', 'transpose', 'parameter', 'bitcast')
                                        for i in inner[1:])):
      cls = 'copy'
    else:
      cls = 'other'
    classes[name] = cls
  return classes


def _hlo_op_times(xplane_path: str) -> dict[str, float]:
  """{HLO instruction name: summed seconds} of the instruction events in a trace file."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  times: dict[str, float] = {}
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        name = stats.get('hlo_op')
        if isinstance(name, str) and name:
          times[name] = times.get(name, 0.0) + event.duration_ns * 1e-9
  return times


def breakdown(compiled: Any, call: Callable[[], Any], top: int = 10) -> dict:
  """Per-class time of one run of `call` (which runs `compiled`), from a profiler trace.

  Returns {'op_time_s': {class: s}, 'op_fractions': {class: share}, 'op_time_total_s': s,
  'top_ops': [[instruction, class, s, op_name], ...]} (the `top` slowest instructions).
  """
  instructions, computations = parse_hlo(compiled.as_text())
  classes = _classes(instructions, computations)
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    try:
      jax.block_until_ready(call())
    finally:
      jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True)
    if not paths:
      raise RuntimeError(f'the profiler wrote no trace under {log_dir}')
    times = _hlo_op_times(paths[0])
  per_class = dict.fromkeys(CLASSES, 0.0)
  counted = {}
  for name, seconds in times.items():
    if name not in classes or instructions[name].opcode in _CONTAINERS:
      continue  # Another module's instruction, or one whose children are counted.
    per_class[classes[name]] += seconds
    counted[name] = seconds
  total = sum(per_class.values())
  if total <= 0:
    raise RuntimeError('the trace has no events of the compiled program\'s instructions; this '
                       'backend\'s runtime may not name them (stat "hlo_op")')
  slowest = sorted(counted.items(), key=lambda kv: -kv[1])[:top]
  return {
      'op_time_s': per_class,
      'op_fractions': {k: v / total for k, v in per_class.items()},
      'op_time_total_s': total,
      'top_ops': [[n, classes[n], s, instructions[n].op_name] for n, s in slowest],
  }
