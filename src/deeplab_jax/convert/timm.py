"""timm state dicts renamed and re-laid-out as official TF variables, then converted strictly.

What maps (checked against timm 1.0's `xception_aligned.py` and `resnet.py`):

* `xception41/65/71` -> `xception_41/65/71`: the same network. Stem conv-BN-ReLU x2; modules with
  ReLU before each separable conv (depthwise -> BN -> pointwise -> BN), the stride in the third one,
  1x1 conv+BN shortcuts in the entry flow and exit block 1, identity in the middle flow, and an exit
  module with ReLU after every BN and no shortcut; symmetric padding equal to TF's fixed padding;
  BatchNorm eps 1e-3 as ours; timm's input normalisation (mean = std = 0.5) is our [-1, 1]. Features
  agree to float rounding at every output stride. (timm's `xception41p/65p` are pre-activation
  variants and do not map. timm's `xception71` at output stride 8 drops the conv shortcut of its
  fifth entry block, whose stride it removes; the weights still map, ours keeps the shortcut.)
* `resnet50/101` -> `resnet_v1_50/101` (7x7 stem) and `resnet50s/101s` (3x3 stem 64-64-128, the
  PSPNet stem) -> `resnet_v1_50/101_beta`: every weight maps 1:1 in name and shape, but the networks
  differ. timm (torchvision) strides each stage in its first unit, TF-slim (and the official DeepLab
  ResNets, and ours) in the last unit of the previous block, so units run at other resolutions and
  different units carry the projection shortcuts' stride; features differ. Such weights are an
  initialisation to fine-tune, not a port. timm's `resnet*c/d` stems are 32-32-64 (and `d` has
  average-pool shortcuts): they do not map.

Layouts: conv OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, C, 1); BatchNorm weight / bias /
running_mean / running_var -> gamma / beta / moving_mean / moving_variance. A BatchNorm epsilon
that differs from ours is absorbed exactly (inference) into moving_variance and, where that would
go negative, gamma. timm's input normalisation is folded into the first conv and its BatchNorm's
moving_mean, exact away from the image border.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from deeplab_jax import models
from deeplab_jax.convert.core import Report, Source, convert
from deeplab_jax.errors import ConversionError
from deeplab_jax.models import resnet, xception

INCEPTION_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# timm model -> (our backbone, input (mean, std) in [0, 1], BatchNorm epsilon).
TIMM_MODELS: dict[str, tuple[str, tuple, float]] = {
    'xception41': ('xception_41', INCEPTION_NORM, 1e-3),
    'xception65': ('xception_65', INCEPTION_NORM, 1e-3),
    'xception71': ('xception_71', INCEPTION_NORM, 1e-3),
    'resnet50': ('resnet_v1_50', IMAGENET_NORM, 1e-5),
    'resnet101': ('resnet_v1_101', IMAGENET_NORM, 1e-5),
    'resnet50s': ('resnet_v1_50_beta', IMAGENET_NORM, 1e-5),
    'resnet101s': ('resnet_v1_101_beta', IMAGENET_NORM, 1e-5),
}
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r'^xception\d+p$', 'a pre-activation Xception (BN-ReLU before each conv), not the DeepLab one'),
    (r'^resnet\d+[cd]$', 'its deep stem is 32-32-64 wide (resnet_v1_*_beta: 64-64-128)'
     + '; `d` also has average-pool shortcuts'),
    (r'^resnet(18|34|152|200)', 'DeepLab has ResNet-50 and -101 only'),
)
RESNET_STRIDE_NOTE = (
    'Note: timm ResNets stride each stage in its first unit, TF-slim ResNets (ours) in the last unit '
    'of the previous block. The weights map 1:1 but the networks compute different features: use '
    'them to initialise fine-tuning, not as a port of the timm model.')
BN_NAMES = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean',
            'running_var': 'moving_variance'}


def resolve_model(name: str) -> tuple[str, str, tuple, float]:
  """(timm architecture, our backbone, input normalisation, BN eps) of timm model `name`[.tag]."""
  arch = name.split('.')[0]
  if arch in TIMM_MODELS:
    return (arch, *TIMM_MODELS[arch])
  for pattern, reason in UNSUPPORTED:
    if re.search(pattern, arch):
      raise ConversionError(f'timm model {name!r} does not map onto a DeepLab backbone: {reason}. '
                            f'Supported: {", ".join(TIMM_MODELS)}.')
  raise ConversionError(f'Unknown timm model {name!r}; supported: {", ".join(TIMM_MODELS)}.')


def _xception_units(backbone: str) -> list[str]:
  """TF scopes of the Xception modules in timm's `blocks` order."""
  units = []
  for block in xception.ARCHITECTURES[backbone]:
    for u in range(block.num_units):
      units.append(f'{backbone}/{block.flow}/{block.name}/unit_{u + 1}/xception_module')
  return units


def _bn(prefix: str, field: str) -> str | None:
  return f'{prefix}/BatchNorm/{BN_NAMES[field]}' if field in BN_NAMES else None


def _conv_or_bn(prefix: str, is_conv: bool, field: str) -> str | None:
  """The TF name of a conv's `weight` (no bias: BN follows) or of its BatchNorm's `field`."""
  if is_conv:
    return f'{prefix}/weights' if field == 'weight' else None
  return _bn(prefix, field)


def _xception_name(key: str, backbone: str, units: Sequence[str]) -> str | None:
  m = re.fullmatch(r'stem\.([01])\.(conv|bn)\.(\w+)', key)
  if m:
    prefix = f'{backbone}/entry_flow/conv1_{int(m[1]) + 1}'
    return _conv_or_bn(prefix, m[2] == 'conv', m[3])
  m = re.fullmatch(r'blocks\.(\d+)\.stack\.conv([123])\.(conv|bn)_(dw|pw)\.(\w+)', key)
  if m and int(m[1]) < len(units):
    part = 'depthwise' if m[4] == 'dw' else 'pointwise'
    prefix = f'{units[int(m[1])]}/separable_conv{m[2]}_{part}'
    if m[3] == 'conv':
      return (f'{prefix}/depthwise_weights' if part == 'depthwise' else f'{prefix}/weights'
              ) if m[5] == 'weight' else None
    return _bn(prefix, m[5])
  m = re.fullmatch(r'blocks\.(\d+)\.shortcut\.(conv|bn)\.(\w+)', key)
  if m and int(m[1]) < len(units):
    prefix = f'{units[int(m[1])]}/shortcut'
    return _conv_or_bn(prefix, m[2] == 'conv', m[3])
  m = re.fullmatch(r'head\.fc\.(weight|bias)', key)
  if m:
    return f'{backbone}/logits/{"weights" if m[1] == "weight" else "biases"}'
  return None


def _resnet_name(key: str, scope: str, deep_stem: bool) -> str | None:
  if key == 'conv1.weight':
    return f'{scope}/conv1/weights'
  m = re.fullmatch(r'conv1\.([036])\.weight', key)
  if m:
    return f'{scope}/conv1_{int(m[1]) // 3 + 1}/weights'
  m = re.fullmatch(r'conv1\.([14])\.(\w+)', key)
  if m:
    return _bn(f'{scope}/conv1_{int(m[1]) // 3 + 1}', m[2])
  m = re.fullmatch(r'bn1\.(\w+)', key)
  if m:
    return _bn(f'{scope}/conv1_3' if deep_stem else f'{scope}/conv1', m[1])
  m = re.fullmatch(r'layer([1-4])\.(\d+)\.(conv|bn)([123])\.(\w+)', key)
  if m:
    prefix = f'{scope}/block{m[1]}/unit_{int(m[2]) + 1}/bottleneck_v1/conv{m[4]}'
    return _conv_or_bn(prefix, m[3] == 'conv', m[5])
  m = re.fullmatch(r'layer([1-4])\.(\d+)\.downsample\.([01])\.(\w+)', key)
  if m:
    prefix = f'{scope}/block{m[1]}/unit_{int(m[2]) + 1}/bottleneck_v1/shortcut'
    return _conv_or_bn(prefix, m[3] == '0', m[4])
  m = re.fullmatch(r'fc\.(weight|bias)', key)
  if m:
    return f'{scope}/logits/{"weights" if m[1] == "weight" else "biases"}'
  return None


def tf_names(keys: Sequence[str], timm_model: str) -> dict[str, str]:
  """{timm key: TF variable name} for the keys of a timm state dict that have one."""
  _, backbone, _, _ = resolve_model(timm_model)
  names = {}
  if backbone.startswith('xception'):
    units = _xception_units(backbone)
    for key in keys:
      name = _xception_name(key, backbone, units)
      if name:
        names[key] = name
  else:
    scope = resnet.scope_name(backbone)
    deep_stem = any(k.startswith('conv1.0.') for k in keys)
    for key in keys:
      name = _resnet_name(key, scope, deep_stem)
      if name:
        names[key] = name
  return names


def to_tf_layout(value: np.ndarray, name: str) -> np.ndarray:
  """PyTorch layout -> TF layout for variable `name`: OIHW -> HWIO, (C,1,k,k) -> (k,k,C,1)."""
  value = np.asarray(value, np.float32)
  if name.endswith('/depthwise_weights'):
    return np.ascontiguousarray(value.transpose(2, 3, 0, 1))
  if name.endswith('/weights') and value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if name.endswith('/logits/weights') and value.ndim == 2:  # Linear (out, in) -> 1x1 conv HWIO.
    return np.ascontiguousarray(value.T[None, None])
  return value


def adjust_bn_epsilon(gamma: np.ndarray, variance: np.ndarray, eps_from: float,
                      eps_to: float) -> tuple[np.ndarray, np.ndarray]:
  """(gamma, moving_variance) for epsilon `eps_to` computing what `eps_from` did at inference.

  The epsilon difference goes into the variance where it stays >= 0; the rest rescales gamma.
  """
  gamma = np.asarray(gamma, np.float64)
  variance = np.asarray(variance, np.float64)
  new_variance = np.maximum(variance + eps_from - eps_to, 0.0)
  new_gamma = gamma * np.sqrt((new_variance + eps_to) / (variance + eps_from))
  return new_gamma.astype(np.float32), new_variance.astype(np.float32)


def preprocessing_affine(backbone: str) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) per RGB channel with our `preprocess(x) = a * x + b` for pixels x in [0, 255]."""
  probe = np.array([[[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]], np.float32)
  out = np.asarray(models.preprocess(probe, backbone), np.float64)[0, 0]
  return out[1] - out[0], out[0]


def normalisation_change(backbone: str, mean: Sequence[float], std: Sequence[float]
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(s, o) per channel with timm's input t = s * u + o for our preprocessed input u.

  timm feeds t = (x / 255 - mean) / std; we feed u = a x + b, so s = 1 / (255 a std) and
  o = (-b / (255 a) - mean) / std.
  """
  a, b = preprocessing_affine(backbone)
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  return 1.0 / (255.0 * a * std), (-b / (255.0 * a) - mean) / std


def fold_input_normalisation(kernel: np.ndarray, moving_mean: np.ndarray, backbone: str,
                             mean: Sequence[float], std: Sequence[float]
                             ) -> tuple[np.ndarray, np.ndarray]:
  """First conv kernel (HWIO) and its BN moving_mean for our input scaling instead of timm's.

  The kernel takes the scale of `normalisation_change`; the constant response to its offset (exact
  where the conv window is inside the image) moves into moving_mean.
  """
  scale, offset = normalisation_change(backbone, mean, std)
  kernel64 = np.asarray(kernel, np.float64)
  constant = np.einsum('hwio,i->o', kernel64, offset)
  new_kernel = kernel64 * scale[None, None, :, None]
  return new_kernel.astype(np.float32), (np.asarray(moving_mean, np.float64) - constant).astype(
      np.float32)


def first_conv(backbone: str) -> str:
  """TF scope of the backbone's first conv."""
  scope = models.backbone_scope(backbone)
  if backbone.startswith('xception'):
    return f'{scope}/entry_flow/conv1_1'
  return f'{scope}/conv1_1' if backbone.endswith('_beta') else f'{scope}/conv1'


def our_bn_epsilon(backbone: str) -> float:
  return models.backbones.backbone_batch_norm(backbone).epsilon


def timm_source(state_dict: Mapping[str, Any], timm_model: str, description: str,
                input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                bn_epsilon: float | None = None) -> tuple[Source, list[str]]:
  """A `Source` of TF-named, TF-laid-out arrays from a timm state dict, and notes for the report.

  Keys without a TF name stay under their timm name (the conversion reports them as unused), except
  `num_batches_tracked` counters, which are skipped.
  """
  _, backbone, (mean0, std0), eps0 = resolve_model(timm_model)
  mean = tuple(input_mean) if input_mean is not None else mean0
  std = tuple(input_std) if input_std is not None else std0
  eps_from = bn_epsilon if bn_epsilon is not None else eps0
  eps_to = our_bn_epsilon(backbone)
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  skipped = {k: 'BatchNorm update counter' for k in arrays if k.endswith('num_batches_tracked')}
  names = tf_names([k for k in arrays if k not in skipped], timm_model)
  values: dict[str, np.ndarray] = {}
  labels: dict[str, str] = {}
  for key, value in arrays.items():
    if key in skipped:
      continue
    name = names.get(key, key)
    if name in values:
      raise ConversionError(f'timm keys {labels[name]} and {key} both map to {name}.')
    values[name] = to_tf_layout(value, name) if key in names else np.asarray(value)
    labels[name] = key

  notes = []
  if eps_from != eps_to:
    for name in [n for n in values if n.endswith('/BatchNorm/moving_variance')]:
      gamma_name = name[:-len('moving_variance')] + 'gamma'
      if gamma_name in values:
        values[gamma_name], values[name] = adjust_bn_epsilon(values[gamma_name], values[name],
                                                             eps_from, eps_to)
    notes.append(f'BatchNorm epsilon {eps_from:g} (timm) -> {eps_to:g} (ours): absorbed into '
                 'moving_variance/gamma, exact at inference.')
  scale, offset = normalisation_change(backbone, mean, std)
  conv = first_conv(backbone)
  if not (np.allclose(scale, 1.0, rtol=0, atol=1e-7) and np.allclose(offset, 0.0, atol=1e-7)):
    kernel_name, mean_name = f'{conv}/weights', f'{conv}/BatchNorm/moving_mean'
    if kernel_name in values and mean_name in values:
      values[kernel_name], values[mean_name] = fold_input_normalisation(
          values[kernel_name], values[mean_name], backbone, mean, std)
      notes.append(f"timm input normalisation (mean {mean}, std {std}) folded into {conv}: "
                   'exact away from the image border.')
  if backbone.startswith('resnet'):
    notes.append(RESNET_STRIDE_NOTE)
  source = Source(description=description, shapes={n: tuple(v.shape) for n, v in values.items()},
                  load=values.__getitem__, labels=labels, skipped=skipped)
  return source, notes


def convert_state_dict(state_dict: Mapping[str, Any], timm_model: str,
                       model_config: ml_collections.ConfigDict, skip: Sequence[str] = (),
                       seed: int = 0, *, description: str | None = None,
                       input_mean: Sequence[float] | None = None,
                       input_std: Sequence[float] | None = None, bn_epsilon: float | None = None,
                       initialise: bool = True) -> tuple[dict[str, Any], Report]:
  """Variables of the model of `model_config` from timm `timm_model`'s state dict (numpy/torch)."""
  _, backbone, _, _ = resolve_model(timm_model)
  if model_config.backbone != backbone:
    raise ConversionError(f'timm {timm_model} is our {backbone}, but config.model.backbone is '
                          f'{model_config.backbone!r}: set --config.model.backbone={backbone}.')
  if model_config.width_multiplier != 1.0:
    raise ConversionError('timm weights are full width: set --config.model.width_multiplier=1.0.')
  state_dict = {k: (v.detach().cpu().numpy() if hasattr(v, 'detach') else v)
                for k, v in state_dict.items()}
  source, notes = timm_source(state_dict, timm_model, description or f'timm {timm_model}',
                              input_mean, input_std, bn_epsilon)
  variables, report = convert(source, model_config, skip, seed, initialise)
  report.notes.extend(notes)
  return variables, report


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict file as numpy: safetensors, or a torch file read with `weights_only=True`."""
  if not os.path.exists(path):
    raise ConversionError(f'No weights file at {path}.')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return load_file(path)
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f'Reading {path} needs torch (pip install -e ".[parity]"), or convert it '
                          'to .safetensors.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model', 'state_dict_ema'):
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
      state = state[key]
      break
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, 'detach')}


def convert_file(path: str, timm_model: str, model_config: ml_collections.ConfigDict,
                 skip: Sequence[str] = (), seed: int = 0, **kwargs) -> tuple[dict[str, Any], Report]:
  """`convert_state_dict` of a weights file (.safetensors, .pth, .bin)."""
  resolve_model(timm_model)  # Fail on an unsupported model before reading the file.
  return convert_state_dict(load_state_dict(path), timm_model, model_config, skip, seed,
                            description=f'timm {timm_model} ({path})', **kwargs)
