"""The config schema: every field with its one default, and the functions that derive from it.

`get_base_config()` is what every `configs/*.py` file starts from; field names are the public
interface (CLI overrides such as `--config.optim.base_lr=0.01`, docs, tools). `tiny_config()` is a
complete config of a tiny model on `deeplab_shapes/tiny` for tests and measurements, `apply_smoke`
shrinks any config to that model for a quick run, and `eval_output_stride` is the output stride
evaluation runs at.
"""

from __future__ import annotations

import jax
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """PASCAL VOC 2012 with Xception-65 DeepLab v3+ (separable ASPP and decoder), official recipe."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.backbone = 'xception_65'  # xception_{41,65,71}, resnet_v1_{50,101}[_beta], mobilenet_v2
  m.output_stride = 16  # Training output stride: 8, 16 or 32.
  # ASPP rates at the training OS. None: from the OS (6/12/18 at 16); (): no atrous branches.
  m.atrous_rates = ml_collections.FieldReference(None, field_type=tuple)
  m.multi_grid = ml_collections.FieldReference(None, field_type=tuple)  # None: (1,1,1) / (1,2,4).
  m.decoder = True  # False: DeepLab v3 (logits straight from ASPP).
  m.aspp_separable = True
  m.decoder_separable = True
  m.image_pooling = True
  m.num_classes = 21
  m.aspp_channels = 256
  m.low_level_channels = 48
  m.decoder_channels = 256
  # Scales backbone widths (tiny variants for tests and the demo); for mobilenet_v2 it is the
  # official depth multiplier with its rounding (0.5: the dm05 model-zoo checkpoints).
  m.width_multiplier = 1.0
  m.dropout_rate = 0.1
  m.depthwise_impl = 'auto'  # 'auto': shift-and-add on CPU, grouped conv on GPU/TPU.
  m.freeze_backbone_bn = False
  m.dtype = 'float32'  # Compute dtype; 'bfloat16' keeps fp32 params and BN statistics.
  m.remat = False  # Rematerialise backbone units (less memory, more compute).
  # None: the official BatchNorm decays (0.9997; ResNet backbone 0.95). Short runs need less.
  m.bn_decay = ml_collections.FieldReference(None, field_type=float)

  c.data = d = ml_collections.ConfigDict()
  d.dataset = 'voc2012_segmentation'  # TFDS name.
  d.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir.
  d.train_split = 'train_aug'
  d.eval_split = 'validation'
  d.min_scale = 0.5
  d.max_scale = 2.0
  d.scale_step = 0.25
  d.flip = True
  d.shuffle_buffer = 2048
  d.prefetch = 2

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16  # Global batch over all devices.
  t.num_steps = 30_000
  t.crop_size = (513, 513)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.seed = 0
  t.top_k_percent_pixels = 1.0  # < 1: hard-pixel mining over the top-k% losses.
  t.class_weights = ml_collections.FieldReference(None, field_type=tuple)
  # Add the devices' partial sums (BatchNorm statistics, loss, gradients) in device order: the same
  # number of devices then trains bit-identically in any process layout (1x8 = 2x4 = 8x1). False:
  # XLA's all-reduce, whose order (and last bits) depends on the layout.
  t.ordered_reductions = False

  c.optim = o = ml_collections.ConfigDict()
  o.base_lr = 0.007
  o.end_lr = 0.0
  o.power = 0.9
  o.momentum = 0.9
  o.weight_decay = 4e-5
  o.warmup_steps = 0
  o.warmup_lr = 0.0  # Slow start: learning rate during warm-up ramps from this to base_lr.
  o.warmup_mode = 'linear'  # 'linear' ramp, or 'constant' warmup_lr (the official slow start).
  o.grad_clip_norm = 0.0  # 0 = off.

  c.eval = e = ml_collections.ConfigDict()
  e.output_stride = ml_collections.FieldReference(None, field_type=int)  # None: model's.
  e.crop_size = (513, 513)
  e.scales = (1.0,)
  e.flip = False
  e.batch_size = 8
  e.every = 2000  # Steps between evaluations during train_and_eval.
  e.checkpoint_step = ml_collections.FieldReference(None, field_type=int)  # None: latest.
  e.num_images = ml_collections.FieldReference(None, field_type=int)  # None: whole split.
  e.num_summary_images = 3
  # 'whole': each image padded to crop_size, one pass. 'slide': windows of crop_size every `stride`
  # pixels, logits averaged where they overlap (`deeplab_jax.sliding`).
  e.mode = 'whole'
  e.stride = ml_collections.FieldReference(None, field_type=tuple)  # None: 2/3 of the window.
  # Boundary mIoU in bands of these widths (px) around label boundaries; () = off (`trimap`).
  e.trimap_widths = (1, 2, 4, 8, 16, 24, 32, 40)
  e.plots = True  # Per-class IoU, confusion and trimap PNGs beside the eval JSON (`plots`).
  # What this config's eval setting should give (a published or measured figure), for
  # `deeplab_jax.tools.reproduce`; per class in class order where the reference has them.
  e.expected_miou = ml_collections.FieldReference(None, field_type=float)
  e.expected_per_class_iou = ml_collections.FieldReference(None, field_type=tuple)

  c.init_from = ml_collections.FieldReference(None, field_type=str)  # Checkpoint dir to start from.
  c.smoke = False  # True: shrink everything for a quick local run.
  return c


def eval_output_stride(config: ml_collections.ConfigDict) -> int:
  """The output stride evaluation and inference run at: `eval.output_stride`, else the model's."""
  return int(config.eval.output_stride or config.model.output_stride)


# The tiny model: widths that make a DeepLab of any backbone compile and run in seconds on a CPU.
TINY_MODEL = {'width_multiplier': 0.0625, 'aspp_channels': 16, 'decoder_channels': 16,
              'low_level_channels': 8}


def tiny_config(data_dir: str | None = None) -> ml_collections.ConfigDict:
  """A tiny ResNet-50-beta DeepLab v3+ on `deeplab_shapes/tiny` (24 + 8 images, built on first use
  under `data_dir`): 6 steps of batch 4 at 33x33, a checkpoint every 3 steps, eval at the end.

  Tests, the memory soak (`deeplab_jax.tools.soak`) and examples start from it and override what they
  measure.
  """
  c = get_base_config()
  m = c.model
  m.backbone = 'resnet_v1_50_beta'
  m.update(TINY_MODEL)
  m.num_classes = 6
  m.bn_decay = 0.9  # Moving averages that settle within a few steps.
  d = c.data
  d.dataset = 'deeplab_shapes/tiny'
  d.data_dir = data_dir
  d.train_split = 'train'
  d.shuffle_buffer = 64
  t = c.train
  t.batch_size = 4
  t.crop_size = (33, 33)
  t.num_steps = 6
  t.log_every = 1
  t.checkpoint_every = 3
  c.optim.base_lr = 0.05
  e = c.eval
  e.crop_size = (65, 65)
  e.batch_size = 4
  e.every = 6
  e.num_summary_images = 2
  return c


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With `config.smoke=True`, a copy shrunk for a quick local run (the tiny model's widths, 20
  steps, 65x65 crops); otherwise `config` itself. Idempotent."""
  if not config.smoke:
    return config
  c = config.copy_and_resolve_references()
  n = jax.device_count()
  m = c.model
  for field, value in TINY_MODEL.items():
    m[field] = min(m[field], value)
  m.bn_decay = min(m.bn_decay or 0.9, 0.9)  # Moving averages that settle in 20 steps.
  c.train.num_steps = min(c.train.num_steps, 20)
  c.train.batch_size = 2 * n
  c.train.crop_size = (65, 65)
  if m.atrous_rates is not None:  # Rates a config sets must fit the smaller feature maps.
    feature = -(-c.train.crop_size[0] // m.output_stride)
    m.atrous_rates = tuple(max(1, min(int(r), feature - 1)) for r in m.atrous_rates)
  c.train.log_every = min(c.train.log_every, 5)
  c.train.checkpoint_every = min(c.train.checkpoint_every, 10)
  c.eval.crop_size = (65, 65)
  c.eval.batch_size = 2 * n
  c.eval.every = min(c.eval.every, c.train.num_steps)
  c.eval.num_images = min(c.eval.num_images or 8, 8)
  return c
