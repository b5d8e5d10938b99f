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

`dense_ops(text)` lists the module's dots and dense convolutions with their shapes, FLOPs and how
often a step runs each; `matmul_floor(ops)` times each distinct one alone, jitted, so that their sum
says how long the step's matmul arithmetic takes at the rate XLA reaches on those shapes when
nothing else runs (inside the step they can run faster, their operands still in cache from the op
that made them).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


_DEFINITION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]')
_OPERANDS = re.compile(r'\s(dot|convolution)\(([^)]*)\)')
_OPERAND_NAME = re.compile(r'%([\w.\-]+)')
_DIMS = re.compile(r'(lhs_contracting_dims|rhs_contracting_dims|lhs_batch_dims|rhs_batch_dims)'
                   r'=\{([\d,]*)\}')
_WINDOW = re.compile(r'window=\{([^}]*)\}')
_DIM_LABELS = re.compile(r'dim_labels=(\w+)_(\w+)->(\w+)')
_BATCH_GROUPS = re.compile(r'batch_group_count=(\d+)')


@dataclasses.dataclass(frozen=True)
class DenseOp:
  """A dot or dense (ungrouped) convolution of an HLO module, as `dense_ops` found it."""

  opcode: str  # 'dot' | 'convolution'
  dtype: str  # HLO element type of the result, e.g. 'f32'
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  out: tuple[int, ...]
  attributes: tuple[tuple[str, str], ...]  # Dimension numbers, window, dim_labels: to rebuild it.
  op_name: str
  count: int  # How many times one run of the module runs it.

  @property
  def flops(self) -> int:
    """2 * multiply-adds of one run of the op (padding included, as XLA computes it)."""
    attrs = dict(self.attributes)
    if self.opcode == 'dot':
      contracted = _ints(attrs.get('lhs_contracting_dims', ''))
      return 2 * int(np.prod(self.out)) * int(np.prod([self.lhs[d] for d in contracted]))
    out_features = self.rhs[attrs['rhs_labels'].index('o')]
    return 2 * int(np.prod(self.out)) * int(np.prod(self.rhs)) // out_features


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(',') if v)


def _call_counts(instructions: dict[str, Instruction], computations: dict[str, list[str]],
                 entry: str) -> dict[str, int]:
  """{computation: times one run of `entry` runs it} (a while body counts once)."""
  counts: dict[str, int] = {}

  def visit(computation: str, times: int) -> None:
    counts[computation] = counts.get(computation, 0) + times
    for name in computations.get(computation, ()):
      for called in instructions[name].calls:
        visit(called, times)

  visit(entry, 1)
  return counts


def dense_ops(text: str) -> list[DenseOp]:
  """Every dot and ungrouped convolution of the HLO module `text` that its entry reaches."""
  instructions, computations = parse_hlo(text)
  entry = next((m.group(1) for line in text.splitlines()
                if line.startswith('ENTRY') and (m := _HEADER.match(line))), None)
  if entry is None:
    raise ValueError('the HLO text has no ENTRY computation')
  counts = _call_counts(instructions, computations, entry)
  owner = {name: comp for comp, names in computations.items() for name in names}
  shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
  lines = []
  for line in text.splitlines():
    match = _DEFINITION.match(line)
    if match:
      name, dtype, dims = match.groups()
      shapes[name] = (dtype, _ints(dims))
      lines.append((name, line))
  ops = []
  for name, line in lines:
    inst = instructions.get(name)
    if inst is None or inst.opcode not in ('dot', 'convolution') or inst.grouped:
      continue
    if counts.get(owner[name], 0) == 0:
      continue
    operands = _OPERAND_NAME.findall(_OPERANDS.search(line).group(2))
    if len(operands) != 2 or any(o not in shapes for o in operands):
      raise ValueError(f'cannot read the operands of {name!r}: {line.strip()[:200]}')
    attributes = [(key, value) for key, value in _DIMS.findall(line)]
    if inst.opcode == 'convolution':
      window, labels = _WINDOW.search(line), _DIM_LABELS.search(line)
      groups = _BATCH_GROUPS.search(line)
      attributes += [('window', window.group(1) if window else ''),
                     ('lhs_labels', labels.group(1)), ('rhs_labels', labels.group(2)),
                     ('out_labels', labels.group(3)),
                     ('batch_group_count', groups.group(1) if groups else '1')]
    dtype, out = shapes[name]
    ops.append(DenseOp(inst.opcode, dtype, shapes[operands[0]][1], shapes[operands[1]][1], out,
                       tuple(attributes), inst.op_name, counts[owner[name]]))
  return ops


_SPATIAL = 'HWDXYZ'
_DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16, 'f64': jnp.float64}


def _conv_spec(labels: str) -> str:
  """An HLO dim_labels part ('b01f', '01io') as a lax spec ('NHWC', 'HWIO')."""
  named = {'b': 'N', 'f': 'C', 'i': 'I', 'o': 'O'}
  return ''.join(named[c] if c in named else _SPATIAL[int(c)] for c in labels)


def _window(text: str, rank: int) -> dict[str, list]:
  """HLO `window={size=3x3 stride=2x2 pad=0_1x0_1 lhs_dilate=.. rhs_dilate=..}` as lax arguments."""
  fields = dict(item.split('=') for item in text.split())
  ones = [1] * rank

  def ints(key: str) -> list[int]:
    return [int(v) for v in fields[key].split('x')] if key in fields else ones

  pad = ([tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')]
         if 'pad' in fields else [(0, 0)] * rank)
  return {'window_strides': ints('stride'), 'padding': pad, 'lhs_dilation': ints('lhs_dilate'),
          'rhs_dilation': ints('rhs_dilate')}


def rebuild(op: DenseOp) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A function of (lhs, rhs) that computes `op` as lax does (checked against its result shape)."""
  attrs = dict(op.attributes)
  if op.opcode == 'dot':
    numbers = ((_ints(attrs.get('lhs_contracting_dims', '')),
                _ints(attrs.get('rhs_contracting_dims', ''))),
               (_ints(attrs.get('lhs_batch_dims', '')), _ints(attrs.get('rhs_batch_dims', ''))))

    def fn(lhs, rhs):
      return jax.lax.dot_general(lhs, rhs, numbers)
  else:
    specs = tuple(_conv_spec(attrs[f'{part}_labels']) for part in ('lhs', 'rhs', 'out'))
    window = _window(attrs['window'], len(op.lhs) - 2)

    def fn(lhs, rhs):
      return jax.lax.conv_general_dilated(
          lhs, rhs, dimension_numbers=specs, batch_group_count=int(attrs['batch_group_count']),
          **window)
  dtype = _DTYPES[op.dtype]
  shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(op.lhs, dtype),
                         jax.ShapeDtypeStruct(op.rhs, dtype)).shape
  if tuple(shape) != op.out:
    raise ValueError(f'rebuilt {op.opcode} of {op.op_name!r} gives {shape}, the module {op.out}')
  return fn


def matmul_floor(ops: Iterable[DenseOp], repeats: int = 5, top: int = 10) -> dict:
  """Each distinct op of `ops` timed alone (jitted, random operands, median of `repeats` runs after
  one warm-up), times how often the step runs it.

  Returns {'matmul_flops': per run of the module, 'matmul_floor_s': the summed time,
  'matmul_floor_flops_per_s', 'dense_op_count', 'slowest_dense_ops': the `top` largest
  contributions as [op_name, opcode, lhs, rhs, count, seconds, FLOP/s]}.
  """
  groups: dict[tuple, list[DenseOp]] = {}
  for op in ops:
    groups.setdefault((op.opcode, op.dtype, op.lhs, op.rhs, op.attributes), []).append(op)
  key = jax.random.key(0)
  rows, total_s, total_flops, count = [], 0.0, 0, 0
  for same in groups.values():
    op = same[0]
    fn = jax.jit(rebuild(op))
    dtype = _DTYPES[op.dtype]
    key, k1, k2 = jax.random.split(key, 3)
    lhs = jax.random.normal(k1, op.lhs, dtype)
    rhs = jax.random.normal(k2, op.rhs, dtype)
    jax.block_until_ready(fn(lhs, rhs))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(lhs, rhs))
      times.append(time.perf_counter() - start)
    runs = sum(o.count for o in same)
    seconds = statistics.median(times) * runs
    total_s += seconds
    total_flops += op.flops * runs
    count += runs
    rows.append([op.op_name, op.opcode, list(op.lhs), list(op.rhs), runs, seconds,
                 op.flops * runs / seconds])
  rows.sort(key=lambda row: -row[5])
  return {'matmul_flops': total_flops, 'matmul_floor_s': total_s,
          'matmul_floor_flops_per_s': total_flops / total_s if total_s else 0.0,
          'dense_op_count': count, 'slowest_dense_ops': rows[:top]}
