"""The base config every `configs/*.py` file starts from: all fields, documented, with defaults.

Field names are the public interface: CLI overrides (`--config.optim.base_lr=0.01`), docs and tools
use them.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """PASCAL VOC 2012 with Xception-65 DeepLab v3+ (separable ASPP and decoder), official recipe."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.backbone = 'xception_65'  # xception_{41,65,71}, resnet_v1_{50,101}[_beta]
  m.output_stride = 16  # Training output stride: 8, 16 or 32.
  m.atrous_rates = ml_collections.FieldReference(None, field_type=tuple)  # None: from the OS.
  m.multi_grid = ml_collections.FieldReference(None, field_type=tuple)  # None: (1,1,1) / (1,2,4).
  m.decoder = True  # False: DeepLab v3 (logits straight from ASPP).
  m.aspp_separable = True
  m.decoder_separable = True
  m.image_pooling = True
  m.num_classes = 21
  m.aspp_channels = 256
  m.low_level_channels = 48
  m.decoder_channels = 256
  m.width_multiplier = 1.0  # Scales backbone widths: tiny variants for tests and the demo.
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

  c.init_from = ml_collections.FieldReference(None, field_type=str)  # Checkpoint dir to start from.
  c.smoke = False  # True: shrink everything for a quick local run.
  return c
