"""Export a checkpoint for serving without this package: StableHLO, TF SavedModel or TFLite.

Every format runs the evaluator's prediction (`inference.predict` at the eval output stride, scales
and flip of the config: softmax averaged over scales and flips, its argmax the labels) with the
weights inside the artifact, and has the outputs `SemanticPredictions` (int32 labels),
`SemanticProbabilities` (float32) and, on request, `SemanticLogits` (float32, averaged likewise):

- `stablehlo`: `jax.export`, serialized; lowered for CPU, CUDA and TPU; batch and image size
  symbolic. `jax.export.deserialize(blob).call(images)` with images float32 [B, H, W, 3] in 0..255
  returns a dict of the outputs at [B, H, W(, C)]. Images go in as given (the official models saw
  images padded at the bottom/right with the mean pixel to the eval crop).
- `savedmodel`: TF SavedModel (jax2tf: one `XlaCallModule` op) with the official export's serving
  signature: `ImageTensor` uint8 [1, H, W, 3] of any size, padded with the mean pixel to the eval
  crop (a larger image to its own size rounded up to k * output_stride + 1, as
  `inference.Predictor` does) and the outputs cropped back to [1, H, W(, C)]. Weights are
  SavedModel variables.
- `tflite`: the network at the fixed eval crop, builtin ops only, float32 or post-training int8
  quantized with a representative set; input `ImageTensor` float32 [1, crop_h, crop_w, 3] in 0..255,
  already padded (`TFLiteModel` pads and crops like the SavedModel), labels [1, crop_h, crop_w].

`export` loads a checkpoint as `--mode=eval` does and writes one artifact; `check` measures how
well an artifact agrees with the JAX model on images. TensorFlow is imported only by the TF formats.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from deeplab_jax import inference, models, paths, validate
from deeplab_jax.config import apply_smoke, eval_output_stride
from deeplab_jax.errors import ConfigError

FORMATS = ('stablehlo', 'savedmodel', 'tflite')
PLATFORMS = ('cpu', 'cuda', 'tpu')
QUANTIZATIONS = ('none', 'int8')
INPUT = 'ImageTensor'
PREDICTIONS = 'SemanticPredictions'
PROBABILITIES = 'SemanticProbabilities'
LOGITS = 'SemanticLogits'
OUTPUTS = (PREDICTIONS, PROBABILITIES, LOGITS)
DEFAULT_OUTPUTS = (PREDICTIONS, PROBABILITIES)
SERVING_SIGNATURE = 'serving_default'

Variables = Mapping[str, Any]
Outputs = dict[str, np.ndarray]


def depthwise_impl(config: ml_collections.ConfigDict, platforms: Sequence[str]) -> str:
  """`config.model.depthwise_impl` for an artifact: 'auto' is shift-and-add only for a CPU-only
  artifact (XLA:CPU runs it faster), else the grouped conv (GPU/TPU, and TFLite's depthwise op)."""
  impl = config.model.depthwise_impl
  if impl != 'auto':
    return impl
  return 'shift' if tuple(platforms) == ('cpu',) else 'grouped'


def _check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
  outputs = tuple(outputs)
  unknown = [o for o in outputs if o not in OUTPUTS]
  if not outputs or unknown:
    raise ConfigError(f'Export outputs {outputs}: choose one or more of {OUTPUTS}.')
  return outputs


def prediction_fn(config: ml_collections.ConfigDict, impl: str, outputs: Sequence[str]
                  ) -> Callable[[Variables, jax.Array], dict[str, jax.Array]]:
  """(variables, images float32 [B, H, W, 3] in 0..255) -> the `outputs` at [B, H, W(, C)]: the
  evaluator's prediction at the eval output stride, scales and flip."""
  outputs = _check_outputs(outputs)
  model = models.build_model(config.model, eval_output_stride(config), depthwise_impl=impl)
  scales, flip = tuple(config.eval.scales), bool(config.eval.flip)

  def predict(variables: Variables, images: jax.Array) -> dict[str, jax.Array]:
    probs, logits = inference.predict(model, variables, images.astype(jnp.float32), scales, flip)
    result = {PREDICTIONS: inference.labels(probs), PROBABILITIES: probs, LOGITS: logits}
    return {name: result[name] for name in outputs}

  return predict


def _model_variables(variables: Variables) -> dict[str, Any]:
  return {c: jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables[c]))
          for c in ('params', 'batch_stats')}


# ------------------------------------------------------------------------------------------------
# StableHLO.


def export_stablehlo(config: ml_collections.ConfigDict, variables: Variables, *,
                     platforms: Sequence[str] = PLATFORMS, symbolic_size: bool = True,
                     outputs: Sequence[str] = DEFAULT_OUTPUTS) -> jax.export.Exported:
  """The prediction as a `jax.export.Exported` with the weights as constants; batch symbolic, and
  the image size too with `symbolic_size` (else the eval crop)."""
  predict = prediction_fn(config, depthwise_impl(config, platforms), outputs)
  values = _model_variables(variables)
  h, w = config.eval.crop_size
  spec = jax.export.symbolic_args_specs(
      jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32),
      'b, h, w, 3' if symbolic_size else f'b, {h}, {w}, 3')
  return jax.export.export(jax.jit(lambda images: predict(values, images)),
                           platforms=tuple(platforms))(spec)


def write_stablehlo(exported: jax.export.Exported, path: str) -> None:
  with paths.open_file(path, 'wb') as f:
    f.write(exported.serialize())


def load_stablehlo(path: str) -> jax.export.Exported:
  """What a server does (it needs only `jax`): `jax.export.deserialize` of the file."""
  with paths.open_file(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


# ------------------------------------------------------------------------------------------------
# TF SavedModel and TFLite (jax2tf).


def _tf_module(config: ml_collections.ConfigDict, variables: Variables, impl: str,
               outputs: Sequence[str], platforms: Sequence[str], shape: str | None) -> Any:
  """A tf.Module holding the weights as variables and `f(images float32)`, jax2tf-converted with
  polymorphic `shape` (None: static)."""
  import tensorflow as tf  # noqa: PLC0415 - only the TF formats need it.
  from jax.experimental import jax2tf  # noqa: PLC0415 - imports TensorFlow.

  predict = prediction_fn(config, impl, outputs)
  module = tf.Module()
  module.weights = tf.nest.map_structure(tf.Variable, _model_variables(variables))
  module.f = jax2tf.convert(predict, polymorphic_shapes=[None, shape] if shape else None,
                            with_gradient=False,
                            native_serialization_platforms=tuple(platforms))
  return module


def export_savedmodel(config: ml_collections.ConfigDict, variables: Variables, path: str, *,
                      platforms: Sequence[str] = PLATFORMS, symbolic_size: bool = True,
                      outputs: Sequence[str] = DEFAULT_OUTPUTS) -> None:
  """A TF SavedModel with the official serving signature `ImageTensor` -> `outputs` (module doc).

  Without `symbolic_size` the network is exported at the eval crop, and a larger image is an error.
  """
  import tensorflow as tf  # noqa: PLC0415 - only the TF formats need it.

  outputs = _check_outputs(outputs)
  module = _tf_module(config, variables, depthwise_impl(config, platforms), outputs, platforms,
                      '(1, h, w, 3)' if symbolic_size else None)
  crop_h, crop_w = (int(c) for c in config.eval.crop_size)
  output_stride = eval_output_stride(config)
  mean = tf.constant(models.mean_pixel(config.model.backbone), tf.float32)

  def round_up(d: tf.Tensor) -> tf.Tensor:  # inference.padded_size of an image beyond the crop.
    return (d + output_stride - 2) // output_stride * output_stride + 1

  @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name=INPUT)],
               autograph=False)
  def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
    h, w = tf.shape(image)[1], tf.shape(image)[2]
    fits = tf.logical_and(h <= crop_h, w <= crop_w)
    if symbolic_size:
      height = tf.where(fits, crop_h, round_up(h))
      width = tf.where(fits, crop_w, round_up(w))
      checks = []
    else:
      height, width = tf.constant(crop_h), tf.constant(crop_w)
      checks = [tf.debugging.Assert(fits, [
          'ImageTensor of height, width', tf.stack([h, w]), f'exceeds the crop {crop_h}x{crop_w} '
          'this SavedModel was exported at; export with symbolic sizes or a larger '
          'config.eval.crop_size.'])]
    with tf.control_dependencies(checks):
      x = tf.cast(image, tf.float32) - mean
    x = tf.pad(x, [[0, 0], [0, height - h], [0, width - w], [0, 0]]) + mean
    if not symbolic_size:
      x = tf.ensure_shape(x, [1, crop_h, crop_w, 3])
    result = module.f(module.weights, x)
    return {name: tf.identity(result[name][:, :h, :w], name=name) for name in outputs}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={SERVING_SIGNATURE: serve})


def export_tflite(config: ml_collections.ConfigDict, variables: Variables, path: str, *,
                  quantize: str = 'none', representative: Iterable[np.ndarray] = (),
                  outputs: Sequence[str] = (PREDICTIONS,)) -> None:
  """A .tflite of the prediction at the eval crop, builtin ops only: float32, or int8 weights and
  activations (`quantize='int8'`) calibrated on `representative` images (uint8/float [H, W, 3],
  cut to the crop if larger and padded to it with the mean pixel)."""
  import tensorflow as tf  # noqa: PLC0415 - only the TF formats need it.

  if quantize not in QUANTIZATIONS:
    raise ConfigError(f'quantize={quantize!r}; use one of {QUANTIZATIONS}.')
  crop = tuple(int(c) for c in config.eval.crop_size)
  # The grouped conv becomes TFLite's DEPTHWISE_CONV_2D; the float network is lowered for CPU.
  module = _tf_module(config, variables, 'grouped', outputs, ('cpu',), None)

  @tf.function(input_signature=[tf.TensorSpec([1, *crop, 3], tf.float32, name=INPUT)],
               autograph=False)
  def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
    return module.f(module.weights, image)

  module.serve = serve
  mean = models.mean_pixel(config.model.backbone)
  with tempfile.TemporaryDirectory() as tmp:
    tf.saved_model.save(module, tmp, signatures={SERVING_SIGNATURE: serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == 'int8':
      calibration = [
          inference.pad_image(np.asarray(image)[:crop[0], :crop[1], :3], crop, mean)[None]
          for image in representative]
      if not calibration:
        raise ConfigError('int8 quantization needs representative images; none were given.')
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: ([x] for x in calibration)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                             tf.lite.OpsSet.TFLITE_BUILTINS]
    blob = converter.convert()
  with paths.open_file(path, 'wb') as f:
    f.write(blob)


# ------------------------------------------------------------------------------------------------
# Running an artifact on one image (for checks, measurements and as an example of serving).


class TFLiteModel:
  """A .tflite of `export_tflite` in TF's interpreter: pads an image [H, W, 3] with the mean pixel
  to the model's input size, runs it and crops the outputs back to [H, W(, C)]."""

  def __init__(self, path: str, mean_pixel: Sequence[float], num_threads: int | None = None):
    import tensorflow as tf  # noqa: PLC0415 - only the TF formats need it.

    with paths.open_file(path, 'rb') as f:
      self._interpreter = tf.lite.Interpreter(model_content=f.read(), num_threads=num_threads)
    self._runner = self._interpreter.get_signature_runner(SERVING_SIGNATURE)
    self.input_size = tuple(self._runner.get_input_details()[INPUT]['shape'][1:3])
    self.mean_pixel = np.asarray(mean_pixel, np.float32)

  def __call__(self, image: np.ndarray) -> Outputs:
    h, w = image.shape[:2]
    if h > self.input_size[0] or w > self.input_size[1]:
      raise ValueError(f'Image of {h}x{w} exceeds the TFLite input size {self.input_size}; '
                       'resize it, or export with a larger config.eval.crop_size.')
    padded = inference.pad_image(np.asarray(image)[..., :3], self.input_size, self.mean_pixel)
    result = self._runner(**{INPUT: padded[None]})
    return {name: value[0, :h, :w] for name, value in result.items()}


def _padded_runner(config: ml_collections.ConfigDict,
                   call: Callable[[np.ndarray], Mapping[str, Any]]
                   ) -> Callable[[np.ndarray], Outputs]:
  """One image [H, W, 3] through `call` (a padded batch of one -> outputs), padded with the mean
  pixel and cropped back as `inference.Predictor` does."""
  mean = np.asarray(models.mean_pixel(config.model.backbone), np.float32)
  output_stride = eval_output_stride(config)

  def run(image: np.ndarray) -> Outputs:
    h, w = image.shape[:2]
    size = inference.padded_size((h, w), config.eval.crop_size, output_stride)
    result = call(inference.pad_image(np.asarray(image)[..., :3], size, mean)[None])
    return {name: np.asarray(value)[0, :h, :w] for name, value in result.items()}

  return run


def jax_runner(config: ml_collections.ConfigDict, variables: Variables,
               outputs: Sequence[str] = OUTPUTS) -> Callable[[np.ndarray], Outputs]:
  """The JAX model itself, as `inference.Predictor` runs it: the reference."""
  predict = jax.jit(prediction_fn(config, config.model.depthwise_impl, outputs))
  values = jax.device_put(_model_variables(variables))
  return _padded_runner(config, lambda images: predict(values, images))


def stablehlo_runner(exported: jax.export.Exported, config: ml_collections.ConfigDict
                     ) -> Callable[[np.ndarray], Outputs]:
  """One image [H, W, 3] through `exported`, padded and cropped as `inference.Predictor` does."""
  return _padded_runner(config, exported.call)


def savedmodel_runner(path: str) -> Callable[[np.ndarray], Outputs]:
  """One uint8 image [H, W, 3] through the SavedModel's serving signature."""
  import tensorflow as tf  # noqa: PLC0415 - only the TF formats need it.

  serve = tf.saved_model.load(path).signatures[SERVING_SIGNATURE]

  def run(image: np.ndarray) -> Outputs:
    result = serve(**{INPUT: tf.constant(np.asarray(image, np.uint8)[None])})
    return {name: value.numpy()[0] for name, value in result.items()}

  return run


def check(config: ml_collections.ConfigDict, variables: Variables,
          run: Callable[[np.ndarray], Outputs], images: Iterable[np.ndarray]) -> dict[str, Any]:
  """How well `run` (one image -> outputs) agrees with the JAX model (`jax_runner`) on `images`:
  the fraction of pixels with the same label and, for the float outputs the artifact has, the
  largest difference relative to the largest magnitude."""
  reference = jax_runner(config, variables)
  same = total = count = 0
  errors: dict[str, float] = {}
  sizes = set()
  for image in images:
    image = np.asarray(image)[..., :3]
    expected, out = reference(image), run(image)
    count += 1
    sizes.add(tuple(int(d) for d in image.shape[:2]))
    same += int(np.sum(out[PREDICTIONS] == expected[PREDICTIONS]))
    total += expected[PREDICTIONS].size
    for name in (PROBABILITIES, LOGITS):
      if name in out:
        error = np.abs(np.asarray(out[name], np.float32) - expected[name]).max()
        relative = float(error / max(np.abs(expected[name]).max(), 1e-30))
        errors[name] = max(errors.get(name, 0.0), relative)
  if not count:
    raise ConfigError('No images to check the exported model on.')
  return {'images': count, 'sizes': sorted(sizes), 'label_agreement': same / total,
          'max_relative_error': errors}


# ------------------------------------------------------------------------------------------------
# From a workdir.


def artifact_bytes(path: str) -> int:
  """The size of a file, or of every file under a directory (a SavedModel); local or URL."""
  target = paths.to_epath(path)
  if not target.is_dir():
    return int(target.stat().length)
  return sum(artifact_bytes(os.fspath(child)) for child in target.iterdir())


def export(config: ml_collections.ConfigDict, workdir: str | os.PathLike, kind: str,
           output: str, *, platforms: Sequence[str] = PLATFORMS, symbolic_size: bool = True,
           outputs: Sequence[str] | None = None, quantize: str = 'none',
           representative_images: int = 100, check_images: int = 0) -> dict[str, Any]:
  """Export the checkpoint of `workdir` that `--mode=eval` would read as `kind` (a format) at
  `output`.

  `outputs` None: `DEFAULT_OUTPUTS` (TFLite: the labels only). int8 TFLite calibrates on the first
  `representative_images` images of `config.data.train_split`; `check_images` > 0 compares the
  artifact with the JAX model on that many images of `config.data.eval_split`. Returns a report
  (also written as `<output>.json`): what was exported, its size in bytes and the check.
  """
  if kind not in FORMATS:
    raise ConfigError(f'Export format {kind!r}; use one of {FORMATS}.')
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ConfigError(f'Platforms {tuple(platforms)}: use one or more of {PLATFORMS}.')
  config = apply_smoke(config)
  validate.validate_config(config, mode='predict')
  if outputs is None:
    outputs = (PREDICTIONS,) if kind == 'tflite' else DEFAULT_OUTPUTS
  outputs = _check_outputs(outputs)
  variables, step = inference.load_variables(config, workdir)
  output = os.fspath(output)
  logging.info('Exporting checkpoint step %d of %s as %s to %s.', step, workdir, kind, output)
  report: dict[str, Any] = {'format': kind, 'output': output, 'step': step,
                            'backbone': config.model.backbone,
                            'eval_output_stride': eval_output_stride(config),
                            'crop_size': list(config.eval.crop_size),
                            'scales': list(config.eval.scales), 'flip': bool(config.eval.flip),
                            'outputs': list(outputs)}
  if kind == 'stablehlo':
    exported = export_stablehlo(config, variables, platforms=platforms,
                                symbolic_size=symbolic_size, outputs=outputs)
    write_stablehlo(exported, output)
    report.update(platforms=list(platforms), input_shape=str(exported.in_avals[0].shape),
                  depthwise_impl=depthwise_impl(config, platforms))
  elif kind == 'savedmodel':
    export_savedmodel(config, variables, output, platforms=platforms,
                      symbolic_size=symbolic_size, outputs=outputs)
    report.update(platforms=list(platforms), depthwise_impl=depthwise_impl(config, platforms))
  else:
    representative = []
    if quantize == 'int8':
      from deeplab_jax import input_pipeline  # noqa: PLC0415 - TF data only for calibration.

      representative = list(input_pipeline.images(config, config.data.train_split,
                                                  representative_images))
    export_tflite(config, variables, output, quantize=quantize, representative=representative,
                  outputs=outputs)
    report.update(quantize=quantize, representative_images=len(representative))
  report['bytes'] = artifact_bytes(output)
  if check_images > 0:
    from deeplab_jax import input_pipeline  # noqa: PLC0415 - TF data only for the check.

    if kind == 'stablehlo':
      run = stablehlo_runner(load_stablehlo(output), config)
    elif kind == 'savedmodel':
      run = savedmodel_runner(output)
    else:
      run = TFLiteModel(output, models.mean_pixel(config.model.backbone))
    images = input_pipeline.images(config, config.data.eval_split, check_images)
    report['check'] = check(config, variables, run, images)
  with paths.open_file(output.rstrip('/') + '.json', 'w') as f:
    json.dump(report, f, indent=1)
  return report


if __name__ == '__main__':  # `python -m deeplab_jax.export` runs `deeplab_jax.tools.export`.
  from deeplab_jax.tools.export import run as _run

  _run()
