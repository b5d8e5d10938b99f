"""DeepLab v3+ (Xception-65, separable ASPP and decoder, OS 16) in PyTorch, for speed comparisons.

Run (needs the `parity` extra: torch, torchvision, timm; deeplab_jax for the multiply-add count):

    python benchmarks/pytorch_reference.py                      # infer batch 1 and train batch 4, 513x513
    python benchmarks/pytorch_reference.py --mode=train --batch=4 --steps=3 --threads=2
    python benchmarks/pytorch_reference.py --mode=infer --steps=5 --jax_impls=shift,grouped
    python benchmarks/pytorch_reference.py --mode=infer --steps=5 --channels_last --compile

Prints one JSON object per mode with the keys of `python -m deeplab_jax.tools.benchmark` (`compile_s` is
the first, untimed step: PyTorch runs eagerly). On a shared machine, compare frameworks within one
process: `--jax_impls=shift,grouped` also times the JAX model (`deeplab_jax.tools.benchmark.prepare`),
step by step in turn with PyTorch, and prints a JSON object per impl with `speedup_vs_torch`. The backbone is timm's `xception65` (random weights,
`features_only`, output stride 16; its stride-4 feature feeds the decoder); ASPP (1x1, separable 3x3
at rates 6/12/18, image pooling, concat projection, dropout 0.1) and the decoder (48-channel
projection, two separable [3x3, 256], logits with bias) are written here. Training: SGD momentum 0.9,
weight decay 4e-5, cross-entropy ignoring label 255, BatchNorm in training mode. `multiply_adds` is
the JAX model's count (`deeplab_jax.multiply_adds`); `torch_multiply_adds` is this model's own, counted by
`torch.utils.flop_counter`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

IGNORE_LABEL = 255
HEAD_BN = dict(eps=1e-5, momentum=0.0003)  # TF decay 0.9997.


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
  """1x1 conv (no bias) -> BN -> ReLU."""
  return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, **HEAD_BN),
                       nn.ReLU(inplace=True))


class SeparableConv(nn.Sequential):
  """Atrous separable conv: depthwise 3x3 (rate) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""

  def __init__(self, cin: int, cout: int, rate: int = 1):
    super().__init__(
        nn.Conv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False),
        nn.BatchNorm2d(cin, **HEAD_BN), nn.ReLU(inplace=True), conv_bn_relu(cin, cout))


class ASPP(nn.Module):
  """Image pooling, 1x1 and separable atrous 3x3 branches, concatenated and projected."""

  def __init__(self, cin: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18),
               dropout: float = 0.1):
    super().__init__()
    self.pool = conv_bn_relu(cin, channels)
    self.branches = nn.ModuleList([conv_bn_relu(cin, channels)]
                                  + [SeparableConv(cin, channels, r) for r in rates])
    self.project = conv_bn_relu(channels * (len(rates) + 2), channels)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[2:])
    x = torch.cat([pooled] + [b(x) for b in self.branches], dim=1)
    return self.dropout(self.project(x))


class DeepLabV3Plus(nn.Module):
  """timm xception65 (OS 16) -> ASPP -> v3+ decoder -> logits at the input size."""

  def __init__(self, num_classes: int = 21, output_stride: int = 16):
    super().__init__()
    self.backbone = timm.create_model('xception65', pretrained=False, features_only=True,
                                      output_stride=output_stride)
    reductions = self.backbone.feature_info.reduction()
    channels = self.backbone.feature_info.channels()
    self.low_index = reductions.index(4)
    rates = {16: (6, 12, 18), 8: (12, 24, 36)}[output_stride]
    self.aspp = ASPP(channels[-1], 256, rates)
    self.low_project = conv_bn_relu(channels[self.low_index], 48)
    self.decoder = nn.Sequential(SeparableConv(256 + 48, 256), SeparableConv(256, 256))
    self.logits = nn.Conv2d(256, num_classes, 1)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    features = self.backbone(images)
    x = self.aspp(features[-1])
    low = self.low_project(features[self.low_index])
    x = F.interpolate(x, size=low.shape[2:], mode='bilinear', align_corners=True)
    x = self.logits(self.decoder(torch.cat([x, low], dim=1)))
    return F.interpolate(x, size=images.shape[2:], mode='bilinear', align_corners=True)


def timed(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def matmul_reference(size: int = 2048) -> tuple[Callable[[], object], float]:
  """(call, flops) of a float32 `size`^3 matmul, warmed up."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  return lambda: torch.mm(a, b), 2.0 * size**3


def torch_multiply_adds(model: nn.Module, crop: tuple[int, int]) -> int:
  """Conv/matmul multiply-adds of one forward pass of one image, by torch's flop counter."""
  model.eval()
  with torch.inference_mode(), FlopCounterMode(display=False) as counter:
    model(torch.zeros(1, 3, *crop))
  return counter.get_total_flops() // 2


def jax_multiply_adds(crop: tuple[int, int]) -> int | None:
  """The JAX model's count (base config: Xception-65 v3+ SC OS 16), or None without deeplab_jax."""
  try:
    from deeplab_jax import config as config_lib
    from deeplab_jax import multiply_adds
  except ImportError:
    return None
  config = config_lib.get_base_config()
  return int(multiply_adds.count(config, crop_size=crop)['multiply_adds'])


def torch_step(model: nn.Module, mode: str, batch: int, crop: tuple[int, int],
               channels_last: bool, compile_model: bool = False) -> Callable[[], object]:
  """One inference pass or SGD step of `model` on fixed random data (`compile_model`: the forward
  pass through `torch.compile`, whose compilation then falls in the first, untimed step)."""
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  images = (torch.rand(batch, 3, *crop) * 2 - 1).contiguous(memory_format=memory_format)
  model = model.to(memory_format=memory_format)
  forward = torch.compile(model) if compile_model else model
  if mode == 'infer':
    model.eval()

    def step():
      with torch.inference_mode():
        return forward(images)
    return step
  model.train()
  labels = torch.randint(0, 21, (batch, *crop))
  labels[torch.rand(labels.shape) < 0.1] = IGNORE_LABEL
  optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=4e-5)
  loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(images), labels)
    loss.backward()
    optimizer.step()
    return loss
  return step


def jax_steps(mode: str, batch: int, crop: tuple[int, int], impls: list[str]) -> dict:
  """{impl: deeplab_jax.tools.benchmark.Prepared} of the base config (Xception-65 v3+ SC, OS 16)."""
  from deeplab_jax import config as config_lib
  from deeplab_jax.tools import benchmark as jax_benchmark
  prepared = {}
  for impl in impls:
    config = config_lib.get_base_config()
    config.model.depthwise_impl = impl
    config.train.crop_size = config.eval.crop_size = crop
    prepared[impl] = jax_benchmark.prepare(config, mode, batch)
  return prepared


def jax_calls(calls: dict, prepared: dict, matmul_size: int) -> float:
  """Add blocking, warmed-up calls of the `prepared` JAX steps and of the JAX reference matmul to
  `calls`; returns the matmul's FLOP count."""
  import jax

  from deeplab_jax.tools import benchmark as jax_benchmark
  matmul, work = jax_benchmark.matmul_reference(matmul_size)
  for impl, prep in prepared.items():
    calls[f'jax_{impl}'] = lambda c=prep.call: jax.block_until_ready(c())
    calls[f'jax_{impl}']()  # One untimed step after compilation, as the JAX benchmark does.
  calls['jax_matmul'] = lambda: jax.block_until_ready(matmul())
  return work


def jax_summarise(prepared: object, times: dict[str, list], name: str, matmul: dict) -> dict:
  """`deeplab_jax.tools.benchmark.summarise`: the JAX benchmark's JSON for the interleaved calls
  `name` of `times` (`interleaved`)."""
  from deeplab_jax.tools import benchmark as jax_benchmark
  return jax_benchmark.summarise(prepared, times[name], matmul, times[f'{name}_system_s'],
                                 times[f'{name}_faults'])


def interleaved(calls: dict[str, Callable[[], object]], steps: int) -> dict[str, list[float]]:
  """Times of `steps` rounds, each calling every entry of `calls` once, in order; also, under
  `'{name}_system_s'` and `'{name}_faults'`, each call's system CPU seconds and minor page faults."""
  times = {f'{name}{part}': [] for name in calls for part in ('', '_system_s', '_faults')}
  for _ in range(steps):
    for name, call in calls.items():
      before = resource.getrusage(resource.RUSAGE_SELF)
      times[name].append(timed(call))
      after = resource.getrusage(resource.RUSAGE_SELF)
      times[f'{name}_system_s'].append(after.ru_stime - before.ru_stime)
      times[f'{name}_faults'].append(after.ru_minflt - before.ru_minflt)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', choices=('infer', 'train', 'both'), default='both')
  parser.add_argument('--batch', type=int, default=None, help='default: infer 1, train 4')
  parser.add_argument('--crop', type=int, default=513)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--compile', action='store_true', help='torch.compile the model')
  parser.add_argument('--matmul_size', type=int, default=2048)
  parser.add_argument('--jax_impls', default='',
                      help='e.g. "shift,grouped": also time the JAX model with these depthwise '
                           'impls, interleaved step by step with PyTorch in this process')
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  crop = (args.crop, args.crop)
  model = DeepLabV3Plus()
  macs_torch = torch_multiply_adds(model, crop)
  macs = jax_multiply_adds(crop)
  impls = [i for i in args.jax_impls.split(',') if i]
  for mode in ('infer', 'train') if args.mode == 'both' else (args.mode,):
    batch = args.batch or (1 if mode == 'infer' else 4)
    step = torch_step(model, mode, batch, crop, args.channels_last, args.compile)
    first = timed(step)
    prepared = jax_steps(mode, batch, crop, impls)
    torch_matmul, work = matmul_reference(args.matmul_size)
    calls = {'torch': step, 'torch_matmul': torch_matmul}
    if prepared:
      jax_work = jax_calls(calls, prepared, args.matmul_size)
    times = interleaved(calls, args.steps)
    median = statistics.median(times['torch'])
    images_per_s = batch / median
    matmul_flops_per_s = work / statistics.median(times['torch_matmul'])
    passes = 3 if mode == 'train' else 1
    flops_per_s = 2.0 * (macs or macs_torch) * passes * images_per_s
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        'mode': mode, 'batch': batch, 'crop_size': list(crop),
        'framework': f'torch {torch.__version__}, timm {timm.__version__}',
        'device': f'cpu:{platform.processor() or platform.machine()}',
        'device_count': 1,
        'threads': torch.get_num_threads(),
        'channels_last': args.channels_last,
        'torch_compile': args.compile,
        'compile_s': first,
        'steps': args.steps,
        'step_time_median_s': median,
        'step_time_min_s': min(times['torch']),
        'step_system_cpu_s_median': statistics.median(times['torch_system_s']),
        'step_minor_faults_median': int(statistics.median(times['torch_faults'])),
        'images_per_s': images_per_s,
        'peak_memory_bytes': rss if sys.platform == 'darwin' else rss * 1024,
        'peak_memory_source': 'process_peak_rss (whole run so far)',
        'multiply_adds': macs,
        'torch_multiply_adds': macs_torch,
        'flops_per_s': flops_per_s,
        'flops_convention': ('train: 2 * multiply_adds * 3 (forward + backward = 3 forward '
                             'passes) per image' if mode == 'train'
                             else 'infer: 2 * multiply_adds per image'),
        'matmul_size': args.matmul_size,
        'matmul_flops_per_s': matmul_flops_per_s,
        'matmul_flops_per_s_max': work / min(times['torch_matmul']),
        'peak_fraction': flops_per_s / matmul_flops_per_s,
        'interleaved_with': [f'jax_{impl}' for impl in impls],
        'load_average': list(os.getloadavg()),
    }
    assert all(math.isfinite(v) for v in result.values() if isinstance(v, float))
    print(json.dumps(result), flush=True)
    for impl, prep in prepared.items():
      jax_times = times[f'jax_{impl}']
      jax_result = jax_summarise(prep, times, f'jax_{impl}', {
          'size': args.matmul_size, 'median': jax_work / statistics.median(times['jax_matmul']),
          'max': jax_work / min(times['jax_matmul'])})
      jax_result['framework'] = 'jax (deeplab_jax), interleaved with torch'
      jax_result['speedup_vs_torch'] = median / statistics.median(jax_times)
      print(json.dumps(jax_result), flush=True)


if __name__ == '__main__':
  main()
