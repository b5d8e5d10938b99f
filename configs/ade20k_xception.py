"""ADE20K (MIT Scene Parsing, 150 classes), DeepLab v3+ with Xception-65.

  python -m deeplab_jax.main --config=configs/ade20k_xception.py --workdir=WORKDIR \\
      --config.init_from=PRETRAINED_WORKDIR

Recipe (official ADE20K setting): output stride 16, separable ASPP and decoder, crop 513x513,
batch 16, 150k steps, lr 0.01 poly, weight decay 4e-5, random scale 0.5..2.0 and flip; the
"other" label 0 is ignored and classes 1..150 become 0..149 (the dataset's label map).

Expected validation mIoU: about 45-46% for the official model zoo's `xception65_ade20k_train`
(ImageNet init, OS 8, scales 0.5..1.75 and flip; a model-zoo figure, not re-measured here); single
scale at OS 16 lands a few points lower. Dataset: `ade20k` (ADEChallengeData2016.zip, see
`deeplab_jax.datasets.ade20k`; TFDS's `scene_parse150` holds other annotations).

No published figure is recorded for this config's own setting (`config.eval.expected_miou` is
None): check a model with `python -m deeplab_jax.tools.reproduce --config=configs/ade20k_xception.py
--workdir=WORKDIR --expect=MIOU` and the figure you are comparing with.
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()
  c.model.num_classes = 150
  c.data.dataset = 'ade20k'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.train.num_steps = 150_000
  c.optim.base_lr = 0.01
  return c
