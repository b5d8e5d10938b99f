"""The conversion core: weights by TF variable name (`Source`) into the model's variables, strictly.

Our parameter paths joined by '/' are the official TF variable names, so a TF checkpoint maps by
name (`convert.tf`); timm state dicts are renamed to those names first (`convert.timm`). The
conversion is strict:
every checkpoint variable must be used and every model variable filled, except what a rule skips
(global step, optimizer slots, moving-average shadows, a backbone checkpoint's ImageNet classifier)
or `--skip=REGEX` names. A checkpoint holding only a backbone fills the backbone; the head (ASPP,
decoder, logits) keeps the model's own initialisation. `--logits_classes=START:STOP` keeps a slice
of a checkpoint's classes (1:151 for the official ADE20K model). The result is written with
`checkpoint.save_variables`, so OUT serves as `--workdir` for evaluation and prediction and as
`config.init_from`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from deeplab_jax import caching, checkpoint, models, paths
from deeplab_jax.errors import ConversionError

Shape = tuple[int, ...]
COLLECTIONS = checkpoint.VARIABLE_COLLECTIONS
BACKBONE_SCOPES = tuple(sorted({models.backbone_scope(b) for b in models.BACKBONES}))

# Checkpoint variables that are never model weights: (pattern, reason).
SKIP_RULES: tuple[tuple[str, str], ...] = (
    (r'(^|/)global_step$', 'training step counter'),
    (r'/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1)$', 'optimizer slot'),
    (r'^beta[12]_power$', 'optimizer slot'),
    (r'ExponentialMovingAverage', 'moving-average shadow'),
    ('^({})/logits/'.format('|'.join(BACKBONE_SCOPES)), "backbone checkpoint's ImageNet classifier"),
    # MobileNetV2's classifier is its 1x1 conv to 1280 channels plus `Logits`; DeepLab stops before.
    ('^MobilenetV2/(Conv_1|Logits)/', "backbone checkpoint's ImageNet classifier"),
)


@dataclasses.dataclass
class Source:
  """Weights by TF variable name: `shapes` lists them all, `load(name)` reads one (float32).

  `labels` optionally gives a variable's original name (e.g. timm's) for messages; `skipped` holds
  original entries left out before naming (original name -> reason).
  """

  description: str
  shapes: dict[str, Shape]
  load: Callable[[str], np.ndarray]
  labels: dict[str, str] = dataclasses.field(default_factory=dict)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)

  def label(self, name: str) -> str:
    original = self.labels.get(name)
    return f'{name} (from {original})' if original and original != name else name


@dataclasses.dataclass
class Report:
  """What a conversion did with every variable."""

  source: str
  backbone: str
  filled: list[str]
  skipped_by_rule: dict[str, str]  # checkpoint name -> reason
  skipped_by_user: list[str]  # checkpoint names matched by --skip
  initialised: list[str]  # model variables left at the model's initialisation
  backbone_only: bool
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    reasons: dict[str, int] = {}
    for reason in self.skipped_by_rule.values():
      reasons[reason] = reasons.get(reason, 0) + 1
    lines = [f'Converted {self.source} for backbone {self.backbone}: '
             f'{len(self.filled)} variables filled.']
    if reasons:
      lines.append('Skipped by rule: ' + ', '.join(f'{n} {r}' for r, n in sorted(reasons.items())))
    if self.skipped_by_user:
      lines.append(f'Skipped by --skip: {len(self.skipped_by_user)} checkpoint variables '
                   f'({_preview(self.skipped_by_user)}).')
    if self.initialised:
      why = ('backbone-only checkpoint: the head keeps its initialisation' if self.backbone_only
             else 'left initialised by --skip')
      modules = sorted({_module_of(n) for n in self.initialised})
      lines.append(f'Initialised ({why}): {len(self.initialised)} variables in {_preview(modules)}.')
    lines.extend(self.notes)
    return '\n'.join(lines)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _module_of(name: str) -> str:
  """`aspp1_depthwise/BatchNorm/gamma` -> `aspp1_depthwise`; backbone names keep their scope."""
  parts = name.split('/')
  return '/'.join(parts[:2]) if parts[0] in ('decoder', 'logits') else parts[0]


def _preview(names: Sequence[str], n: int = 6) -> str:
  names = list(names)
  more = f', ... ({len(names) - n} more)' if len(names) > n else ''
  return ', '.join(names[:n]) + more


# ----------------------------------------------------------------------------------------------
# The model side.


@caching.keyed_cache(maxsize=16, key=caching.config_key)
def _model_variables(model_config: ml_collections.ConfigDict) -> dict[str, tuple[str, Shape]]:
  shapes = models.variable_shapes(model_config)
  out = {}
  for collection in COLLECTIONS:
    flat = traverse_util.flatten_dict(dict(shapes[collection]), sep='/')
    out.update({name: (collection, tuple(s.shape)) for name, s in flat.items()})
  return out


def model_variables(model_config: ml_collections.ConfigDict) -> dict[str, tuple[str, Shape]]:
  """{TF name: (collection, shape)} of every variable of the model of `model_config` (cached)."""
  return dict(_model_variables(model_config))


def initial_values(model_config: ml_collections.ConfigDict, names: Iterable[str],
                   seed: int = 0) -> dict[str, np.ndarray]:
  """The model's own initialisation (`model.init` with `seed`) of the variables `names`.

  Only the requested arrays are outputs of the jitted init, so XLA drops everything else (the
  forward pass, the other initialisers).
  """
  names = sorted(set(names))
  if not names:
    return {}
  model = models.build_model(model_config)
  x = jnp.zeros((1, models.factory.INIT_SIZE, models.factory.INIT_SIZE, 3), jnp.float32)

  def init(rng: jax.Array) -> dict[str, jax.Array]:
    variables = model.init(rng, x, train=False)
    flat = {}
    for collection in COLLECTIONS:
      flat.update(traverse_util.flatten_dict(dict(variables.get(collection, {})), sep='/'))
    return {n: flat[n] for n in names}

  values = jax.jit(init)(jax.random.key(seed))
  return {n: np.asarray(v, np.float32) for n, v in values.items()}


# ----------------------------------------------------------------------------------------------
# The conversion.


def _rule_reason(name: str) -> str | None:
  for pattern, reason in SKIP_RULES:
    if re.search(pattern, name):
      return reason
  return None


def _matches(name: str, patterns: Sequence[re.Pattern]) -> bool:
  return any(p.search(name) for p in patterns)


def _scope_of(name: str) -> str | None:
  top = name.split('/')[0]
  return top if top in BACKBONE_SCOPES else None


def convert(source: Source, model_config: ml_collections.ConfigDict, skip: Sequence[str] = (),
            seed: int = 0, initialise: bool = True) -> tuple[dict[str, Any], Report]:
  """Variables `{'params', 'batch_stats'}` (numpy) of the model of `model_config` from `source`.

  Every source variable must be used (or skipped by `SKIP_RULES` or a `skip` regex) and every model
  variable filled (or matched by a `skip` regex, or a head variable when the source holds only a
  backbone); otherwise ConversionError lists them all, with shapes. Variables left out are
  initialised by the model (`seed`), or absent from the result when `initialise` is False.
  """
  patterns = [re.compile(p) for p in skip]
  expected = model_variables(model_config)
  scope = models.backbone_scope(model_config.backbone)

  by_rule: dict[str, str] = dict(source.skipped)
  by_user: list[str] = []
  candidates: dict[str, Shape] = {}
  for name, shape in sorted(source.shapes.items()):
    reason = _rule_reason(name)
    if reason is not None:
      by_rule[name] = reason
    elif _matches(name, patterns):
      by_user.append(name)
    else:
      candidates[name] = tuple(shape)

  # A backbone checkpoint has nothing outside a backbone scope once the rules have run.
  backbone_only = bool(candidates) and all(_scope_of(n) for n in candidates)
  mismatched, unused, missing, initialised, filled = [], [], [], [], []
  for name, shape in candidates.items():
    if name not in expected:
      unused.append(name)
    elif expected[name][1] != shape:
      mismatched.append(name)
    else:
      filled.append(name)
  for name in sorted(expected):
    if name in candidates:
      continue
    if _matches(name, patterns) or (backbone_only and not name.startswith(scope + '/')):
      initialised.append(name)
    else:
      missing.append(name)
  if mismatched or unused or missing:
    raise ConversionError(_error_message(source, model_config, expected, candidates, mismatched,
                                         unused, missing, backbone_only))

  flat = {name: np.asarray(source.load(name), np.float32) for name in filled}
  for name, value in flat.items():
    if value.shape != expected[name][1]:  # A loader that disagrees with its own shape list.
      raise ConversionError(f'{source.label(name)}: loaded shape {value.shape}, listed shape '
                            f'{expected[name][1]}.')
  if initialise:
    flat.update(initial_values(model_config, initialised, seed))
  variables = {c: {} for c in COLLECTIONS}
  for collection in COLLECTIONS:
    variables[collection] = traverse_util.unflatten_dict(
        {n: v for n, v in flat.items() if expected[n][0] == collection}, sep='/')
  report = Report(source=source.description, backbone=model_config.backbone,
                  filled=sorted(filled), skipped_by_rule=by_rule, skipped_by_user=by_user,
                  initialised=initialised, backbone_only=backbone_only)
  return variables, report


def _error_message(source: Source, model_config: ml_collections.ConfigDict,
                   expected: Mapping[str, tuple[str, Shape]], candidates: Mapping[str, Shape],
                   mismatched: list[str], unused: list[str], missing: list[str],
                   backbone_only: bool) -> str:
  m = model_config
  lines = [f'Cannot convert {source.description} into the model of the config (backbone='
           f'{m.backbone}, num_classes={m.num_classes}, decoder={m.decoder}, '
           f'aspp_separable={m.aspp_separable}, decoder_separable={m.decoder_separable}).']
  scopes = sorted({s for s in map(_scope_of, candidates) if s})
  scope = models.backbone_scope(m.backbone)
  if scopes and scope not in scopes:
    lines.append(f'The checkpoint holds backbone {"/".join(scopes)} but config.model.backbone is '
                 f'{m.backbone!r}: set --config.model.backbone to the checkpoint\'s backbone.')
  if mismatched:
    lines.append(f'{len(mismatched)} variables have a different shape (checkpoint vs model):')
    for name in mismatched:
      lines.append(f'  {source.label(name)}: checkpoint {candidates[name]} vs model '
                   f'{expected[name][1]}')
    if any(n.startswith('logits/semantic/') for n in mismatched):
      classes = candidates.get('logits/semantic/biases', candidates.get(
          'logits/semantic/weights', (0,)))[-1]
      lines.append(f'  -> the checkpoint has {classes} classes, the model {m.num_classes}: set '
                   f'--config.model.num_classes={classes} to keep its classifier, or pass '
                   "--skip='^logits/' to leave the logits initialised (fine-tuning on a new label "
                   'set).')
      if classes == m.num_classes + 1:
        lines.append(f'  -> or, if its class 0 is an ignored "other" class (the official ADE20K '
                     f'checkpoint), --logits_classes=1:{classes} keeps the other {m.num_classes}.')
    if any(not n.startswith('logits/semantic/') for n in mismatched):
      lines.append('  -> other shapes differ: make config.model match the checkpoint (backbone, '
                   'width_multiplier, aspp_channels, low_level_channels, decoder_channels).')
  if unused:
    lines.append(f'{len(unused)} checkpoint variables are not used by the model:')
    lines.extend(f'  {source.label(n)} {candidates[n]}' for n in unused)
  if missing:
    lines.append(f'{len(missing)} model variables are not in the checkpoint:')
    lines.extend(f'  {n} {expected[n][1]}' for n in missing)
  if (unused or missing) and not backbone_only:
    lines.append('Fix: make config.model match the checkpoint (e.g. decoder, image_pooling, '
                 'aspp_separable, decoder_separable, the _beta stem of ResNets), or pass '
                 '--skip=REGEX for the variables to leave out: skipped checkpoint variables are '
                 'not used and skipped model variables keep their initialisation.')
  elif unused or missing:
    lines.append('This is a backbone-only checkpoint (the head is initialised), but its backbone '
                 'does not match config.model.backbone; pass --skip=REGEX to leave variables out.')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Writing.


def write(output: str, variables: Mapping[str, Any], report: Report, step: int = 0) -> str:
  """Save `variables` as checkpoint `step` of workdir `output`, plus `conversion.json` beside it."""
  step_dir = checkpoint.save_variables(output, variables, step)
  with paths.open_file(paths.join(output, 'conversion.json'), 'w') as f:
    json.dump(report.to_json(), f, indent=1)
  return step_dir
