"""timm weights -> deeplab_jax: numerical parity of backbone features with the timm network.

timm's aligned Xception is our network, so converted weights reproduce its features at output
strides 16 and 8. timm's ResNets stride each stage in its first unit where TF-slim (and we) stride
the last unit of the previous block: the parity test moves timm's strides and rates to TF-slim's
places (proving every weight lands right), and checks that unmodified timm features do differ.
"""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from reference_data import reference_shapes

from deeplab_jax import config as config_lib
from deeplab_jax import convert, models
from deeplab_jax.convert import timm as convert_timm
from deeplab_jax.models import resnet, xception

# Other test modules import TensorFlow first; TF and triton both bundle LLVM, and loading triton's
# after TF's segfaults (torchvision -> torch._dynamo -> `import triton`). Triton is GPU-only and
# unused here: hide it, and torch treats it as absent.
sys.modules.setdefault('triton', None)
torch = pytest.importorskip('torch', reason='timm parity needs torch (pip install -e ".[parity]")')
timm = pytest.importorskip('timm', reason='timm parity needs timm (pip install -e ".[parity]")')

SIZE = 65  # 16k+1 and 8k+1: corners align at output strides 16 and 8.
TOLERANCE = 1e-4  # Max abs difference relative to the feature scale (max |feature|).


def model_config(backbone: str):
  config = config_lib.get_base_config()
  config.model.backbone = backbone
  return config.model


def randomise_batchnorm(model, seed: int) -> None:
  """Random BatchNorm affine parameters, and running statistics calibrated on random images.

  Calibrated statistics keep activations O(1) and spatially varied through the whole depth (with
  timm's fresh 0/1 statistics, deep features shrink to their BatchNorm offsets and compare poorly).
  """
  g = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in norms:
      bn.weight.uniform_(0.5, 1.5, generator=g)
      bn.bias.normal_(0.0, 0.2, generator=g)
      bn.reset_running_stats()
      bn.momentum = None  # Cumulative average over the calibration batch.
    model.train()
    model(torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1)
    model.eval()
    for bn in norms:  # Perturb, so that exact statistics are not what makes the test pass.
      bn.running_mean.add_(torch.randn(bn.num_features, generator=g) * 0.05)
      bn.running_var.mul_(torch.empty(bn.num_features).uniform_(0.8, 1.25, generator=g))


def timm_model(name: str, seed: int = 0, **kwargs):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, **kwargs)
  randomise_batchnorm(model, seed)
  return model


def reference_model(name: str, state_dict: dict, float64: bool = False, **kwargs):
  """timm `name` with `state_dict`; in float64 its own rounding drops out of the comparison (the
  ResNets' growing residual sums make float32 rounding ~4e-5 of the feature scale; torch's float64
  depthwise conv is too slow for Xception, whose float32 rounding is ~1e-5)."""
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  model.load_state_dict(state_dict)
  return model.double() if float64 else model


def nchw(x: np.ndarray, float64: bool = False) -> torch.Tensor:
  x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float64 if float64 else np.float32)
  return torch.from_numpy(x)


def images(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@functools.cache
def backbone_fn(architecture: str, output_stride: int):
  """Our backbone at `output_stride`, jitted once: (variables, images 0..255) -> Features."""
  if architecture.startswith('xception'):
    # The grouped depthwise conv compiles faster than CPU's default shift-and-add (equal results).
    module = xception.Xception(architecture, output_stride=output_stride, depthwise_impl='grouped')
  else:
    module = resnet.ResNet(architecture, output_stride=output_stride)

  def apply(variables, x):
    return module.apply(variables, models.preprocess(x, architecture))

  return jax.jit(apply)


def backbone_variables(variables: dict, backbone: str) -> dict:
  scope = models.backbone_scope(backbone)
  return {c: variables[c][scope] for c in ('params', 'batch_stats')}


def capture(module, store: dict, key) -> None:
  """Store a clone of `module`'s output (the next in-place ReLU would overwrite it)."""
  module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.detach().clone()))


@pytest.fixture(scope='module')
def xception65():
  model = timm_model('xception65')
  variables, report = convert_timm.convert_state_dict(
      model.state_dict(), 'xception65', model_config('xception_65'), initialise=False)
  return model.state_dict(), backbone_variables(variables, 'xception_65'), report


@pytest.mark.parametrize('output_stride', [16, 8])
def test_xception65_features_match_timm(xception65, output_stride):
  state_dict, variables, report = xception65
  assert report.backbone_only and not report.notes  # Same BN epsilon and input scaling.
  assert all(n.startswith('xception_65/') for n in report.filled)
  reference = reference_model('xception65', state_dict, output_stride=output_stride)
  taps = {}
  capture(reference.blocks[1].stack.conv2, taps, 4)  # entry block2 separable_conv2 (BN output).
  x = images()
  with torch.no_grad():
    theirs = nhwc(reference.forward_features(nchw(x * 2 / 255 - 1)))
  ours = backbone_fn('xception_65', output_stride)(variables, x)
  error = relative_error(np.asarray(ours.by_stride[output_stride]), theirs)
  print(f'xception65 OS {output_stride}: max |diff| / max |feature| = {error:.2e} '
        f'(scale {np.abs(theirs).max():.3g})')
  assert error <= TOLERANCE
  assert relative_error(np.asarray(ours.decoder), nhwc(taps[4])) <= TOLERANCE


class Subsample(torch.nn.Module):
  """TF-slim's shortcut of a strided unit without projection: a 1x1 max-pool of stride 2."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x[:, :, ::2, ::2]


def move_strides_to_tf_slim(model, output_stride: int, multi_grid=(1, 2, 4)) -> None:
  """Restride a timm ResNet (built at output stride 32) as TF-slim's resnet_v1 with DeepLab's block4.

  TF-slim strides the last unit of blocks 1-3, and from the output stride on runs units at stride 1
  with the rate growing by each skipped stride; block4's units take rate * multi_grid.
  """
  stride, rate = 4, 1
  for b, stage in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
    for u, unit in enumerate(stage):
      unit_stride = 2 if b < 3 and u == len(stage) - 1 else 1
      if stride == output_stride:
        s, r = 1, rate
        rate *= unit_stride
      else:
        s, r = unit_stride, 1
        stride *= unit_stride
      r *= multi_grid[u] if b == 3 else 1
      unit.conv2.stride, unit.conv2.dilation, unit.conv2.padding = (s, s), (r, r), (r, r)
      if unit.downsample is not None:
        unit.downsample[0].stride = (1, 1)  # The projection is in unit_1, never strided here.
      elif s == 2:
        unit.downsample = Subsample()


@pytest.fixture(scope='module')
def resnet50s():
  model = timm_model('resnet50s', seed=1)
  config = model_config('resnet_v1_50_beta')
  # mean = std = 0.5 is exactly our [-1, 1] input: no folding, so parity holds to the border.
  variables, report = convert_timm.convert_state_dict(
      model.state_dict(), 'resnet50s', config, initialise=False, input_mean=(0.5,) * 3,
      input_std=(0.5,) * 3)
  return model.state_dict(), backbone_variables(variables, 'resnet_v1_50_beta'), report


def test_resnet50s_features_match_timm_with_tf_slim_strides(resnet50s, output_stride=8):
  """At output stride 8 (atrous block3 and block4 with multi-grid); 16 differs only in rates."""
  state_dict, variables, report = resnet50s
  assert convert_timm.RESNET_STRIDE_NOTE in report.notes
  x = images(1)
  ours = backbone_fn('resnet_v1_50_beta', output_stride)(variables, x)
  reference = reference_model('resnet50s', state_dict, float64=True)
  move_strides_to_tf_slim(reference, output_stride)
  taps = {}
  capture(reference.layer1[1].bn3, taps, 4)  # block1/unit_2 conv3 BN output: the decoder's.
  with torch.no_grad():
    theirs = nhwc(reference.forward_features(nchw(x * 2 / 255 - 1, float64=True)))
  error = relative_error(np.asarray(ours.by_stride[output_stride]), theirs)
  print(f'resnet50s (TF-slim strides) OS {output_stride}: max |diff| / max |feature| = '
        f'{error:.2e} (scale {np.abs(theirs).max():.3g})')
  assert error <= TOLERANCE
  assert relative_error(np.asarray(ours.decoder), nhwc(taps[4])) <= TOLERANCE

  # Unmodified timm strides the first unit of each stage: the same weights compute other features.
  plain = reference_model('resnet50s', state_dict, output_stride=output_stride)
  with torch.no_grad():
    other = nhwc(plain.forward_features(nchw(x * 2 / 255 - 1)))
  assert relative_error(np.asarray(ours.by_stride[output_stride]), other) > 0.1


def test_imagenet_normalisation_is_folded_into_the_stem(resnet50s):
  """timm's (x/255 - mean)/std input, folded into conv1_1 and its BN: exact away from the border."""
  state_dict, _, _ = resnet50s
  variables, report = convert_timm.convert_state_dict(
      state_dict, 'resnet50s', model_config('resnet_v1_50_beta'), initialise=False)
  assert any('folded into resnet_v1_50/conv1_1' in n for n in report.notes)
  x = images(2)
  ours = backbone_fn('resnet_v1_50_beta', 8)(backbone_variables(variables, 'resnet_v1_50_beta'), x)
  reference = reference_model('resnet50s', state_dict, float64=True)
  taps = {}
  capture(reference.act1, taps, 2)
  mean, std = np.array(convert_timm.IMAGENET_NORM[0]), np.array(convert_timm.IMAGENET_NORM[1])
  with torch.no_grad():
    reference.forward_features(nchw((x / 255 - mean) / std, float64=True))
  margin = 3  # Three 3x3 convs see the padding within 3 pixels of the border at stride 2.
  inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
  assert relative_error(np.asarray(ours.by_stride[2])[inner], nhwc(taps[2])[inner]) <= TOLERANCE


def test_weight_files_map_every_weight(resnet50s, tmp_path):
  """.safetensors and .pth (read with weights_only=True) convert alike, in TF layouts."""
  from safetensors.torch import save_file

  state, _, _ = resnet50s
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'w.safetensors'))
  torch.save(state, tmp_path / 'w.pth')
  config = model_config('resnet_v1_50_beta')
  results = [convert_timm.convert_file(str(tmp_path / name), 'resnet50s.gluon_in1k', config,
                                       initialise=False) for name in ('w.safetensors', 'w.pth')]
  (variables, report), (variables_pth, _) = results
  assert report.backbone_only and len(report.filled) == len(
      [k for k in state if not k.endswith('num_batches_tracked') and not k.startswith('fc.')])
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  flat_pth = traverse_util.flatten_dict(variables_pth['params'], sep='/')
  for name in flat:
    np.testing.assert_array_equal(flat[name], flat_pth[name])
  unit = 'resnet_v1_50/block3/unit_6/bottleneck_v1'
  np.testing.assert_array_equal(flat[f'{unit}/conv2/weights'],
                                state['layer3.5.conv2.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat['resnet_v1_50/block2/unit_1/bottleneck_v1/shortcut/weights'],
                                state['layer2.0.downsample.0.weight'].numpy().transpose(2, 3, 1, 0))
  stats = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  np.testing.assert_array_equal(stats[f'{unit}/conv3/BatchNorm/moving_variance'],
                                state['layer3.5.bn3.running_var'].numpy())
  np.testing.assert_array_equal(flat['resnet_v1_50/conv1_3/BatchNorm/gamma'],
                                state['bn1.weight'].numpy())
  # timm's ImageNet scaling is folded into conv1_1: our input is 2x/255 - 1, timm's (x/255-m)/s.
  scale = 1 / (2 * np.array(convert_timm.IMAGENET_NORM[1]))
  np.testing.assert_allclose(flat['resnet_v1_50/conv1_1/weights'],
                             state['conv1.0.weight'].numpy().transpose(2, 3, 1, 0)
                             * scale[None, None, :, None], rtol=1e-6)


def reference_names(filename: str, scope: str) -> set[str]:
  return {name for name in reference_shapes(filename) if name.startswith(scope + '/')}


@pytest.mark.parametrize('timm_name,tsv,scope', [
    ('xception65', 'tf1_xception65_deeplabv3plus_os16.tsv', 'xception_65'),
    ('resnet101s', 'tf1_resnet101beta_deeplabv3plus_os16.tsv', 'resnet_v1_101')])
def test_timm_names_are_the_official_names(timm_name, tsv, scope):
  """Every timm weight gets an official TF name (tests/data/reference), and every backbone name is
  hit."""
  official = reference_names(tsv, scope)
  keys = [k for k in timm.create_model(timm_name).state_dict()
          if not k.endswith('num_batches_tracked')]
  names = convert_timm.tf_names(keys, timm_name)
  classifier = {f'{scope}/logits/weights', f'{scope}/logits/biases'}
  assert set(keys) == set(names)
  assert set(names.values()) == official | classifier
  assert len(set(names.values())) == len(names)


def test_plain_resnet_stem_names():
  """timm resnet50 (7x7 stem) -> resnet_v1_50/conv1; the units map as for resnet50s."""
  keys = list(timm.create_model('resnet50').state_dict())
  names = convert_timm.tf_names(keys, 'resnet50')
  assert names['conv1.weight'] == 'resnet_v1_50/conv1/weights'
  assert names['bn1.running_var'] == 'resnet_v1_50/conv1/BatchNorm/moving_variance'
  assert (names['layer4.0.downsample.0.weight']
          == 'resnet_v1_50/block4/unit_1/bottleneck_v1/shortcut/weights')
  deep = convert_timm.tf_names(list(timm.create_model('resnet50s').state_dict()), 'resnet50s')
  units = lambda d: {v for v in d.values() if '/block' in v}  # noqa: E731
  assert units(names) == units(deep)


def test_depthwise_and_linear_layouts():
  depthwise = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
  out = convert_timm.to_tf_layout(depthwise, 'a/separable_conv1_depthwise/depthwise_weights')
  assert out.shape == (3, 3, 2, 1) and out[0, 2, 1, 0] == depthwise[1, 0, 0, 2]
  conv = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3)
  out = convert_timm.to_tf_layout(conv, 'a/conv2/weights')
  assert out.shape == (3, 3, 2, 4) and out[1, 2, 0, 3] == conv[3, 0, 1, 2]


def test_bn_epsilon_is_absorbed_exactly():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(100, 6))
  gamma, beta, mean = rng.uniform(0.5, 1.5, 6), rng.normal(size=6), rng.normal(size=6)
  variance = np.array([1.0, 0.3, 1e-2, 5e-4, 1e-6, 0.0])  # Some far below the epsilon change.
  bn = lambda g, v, eps: g * (x - mean) / np.sqrt(v + eps) + beta  # noqa: E731
  new_gamma, new_variance = convert_timm.adjust_bn_epsilon(gamma, variance, 1e-5, 1e-3)
  assert np.all(new_variance >= 0)
  np.testing.assert_allclose(bn(new_gamma, new_variance, 1e-3), bn(gamma, variance, 1e-5),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new_gamma[:3], gamma[:3].astype(np.float32))  # Only variance moved.


def test_unsupported_models_say_why():
  cases = {'xception65p': 'pre-activation', 'resnet50d': '32-32-64', 'resnet152': 'ResNet-50 and',
           'vit_base_patch16_224': 'Unknown timm model'}
  for name, reason in cases.items():
    with pytest.raises(convert.ConversionError, match=reason):
      convert_timm.resolve_model(name)
  assert convert_timm.resolve_model('xception65.tf_in1k')[1] == 'xception_65'
  with pytest.raises(convert.ConversionError, match='--config.model.backbone=xception_65'):
    convert_timm.convert_state_dict({}, 'xception65', model_config('resnet_v1_101_beta'))
