"""Export: StableHLO, TF SavedModel and TFLite answer as the JAX model does, on images of several
sizes, and load where this package (StableHLO) or JAX (SavedModel) is not importable."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakes import FAKE_DATASET, random_variables
from reference_data import MOBILENET_DM05_TSV, reference_shapes, reference_values
from test_convert_tf import write_tf1_checkpoint

from deeplab_jax import checkpoint, export, inference
from deeplab_jax.errors import ConfigError
from deeplab_jax.tools import app
from deeplab_jax.tools import convert as convert_tool
from deeplab_jax.tools import export as export_tool

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CROP = (33, 33)
# Smaller than the eval crop (padded), the crop itself, larger (padded to k * OS + 1).
SIZES = ((20, 27), (33, 33), (40, 50))
CONFIG_FILE = textwrap.dedent('''
    from deeplab_jax.config import get_base_config


    def get_config():
      c = get_base_config()
      c.model.backbone = 'mobilenet_v2'
      c.model.atrous_rates = ()
      c.model.decoder = False
      c.model.width_multiplier = 0.25
      c.model.aspp_channels = 16
      c.model.num_classes = 3
      c.model.depthwise_impl = 'grouped'  # What multi-platform exports use: the same program.
      c.data.dataset = '{dataset}'
      c.eval.crop_size = {crop}
      return c
''')


def images(sizes=SIZES, seed=0) -> list[np.ndarray]:
  """Smooth random images (uint8): structure at the scale of the network's receptive field."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    coarse = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3))
    image = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
    out.append(np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(config file, config, variables, workdir) of a tiny MobileNetV2 DeepLab with random weights."""
  root = tmp_path_factory.mktemp('export')
  config_file = root / 'config.py'
  config_file.write_text(CONFIG_FILE.format(dataset=FAKE_DATASET, crop=CROP))
  config = load_config(config_file)
  variables = random_variables(config)
  # Without the logits' biases (which dominate random logits) the labels vary over the image.
  variables['params']['logits']['semantic']['biases'] = np.zeros(3, np.float32)
  workdir = root / 'workdir'
  checkpoint.save_variables(workdir, variables, step=5)
  return config_file, config, variables, workdir


def load_config(path, **model):
  spec = importlib.util.spec_from_file_location('export_test_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(model)
  return config


def run_python(script: str, block: tuple[str, ...]) -> subprocess.CompletedProcess:
  """`script` in a fresh interpreter in which the modules `block` cannot be imported."""
  prelude = ''.join(f'sys.modules[{m!r}] = None\n' for m in block)
  result = subprocess.run([sys.executable, '-c', 'import sys\n' + prelude + script],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def relative_error(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_stablehlo_has_symbolic_shapes_and_runs_with_jax_alone(setup, tmp_path):
  """Multi-scale at symbolic batch and image sizes; the file is called by a process that cannot
  import deeplab_jax, flax or TensorFlow, on batches of two sizes."""
  config_file, config, variables, workdir = setup
  output = tmp_path / 'model.stablehlo'
  report = app.call(export_tool, [
      f'--config={config_file}', f'--workdir={workdir}', '--format=stablehlo',
      f'--output={output}', '--outputs=SemanticPredictions,SemanticLogits',
      '--config.eval.scales=(0.75,1.0)'])
  assert report['input_shape'] == '(b, h, w, 3)' and report['platforms'] == ['cpu', 'cuda', 'tpu']
  assert report['step'] == 5 and report['bytes'] == output.stat().st_size
  assert json.loads((tmp_path / 'model.stablehlo.json').read_text())['format'] == 'stablehlo'
  batches = {'a': np.stack(images([(33, 33)] * 2)), 'b': images([(41, 57)])[0][None]}
  np.savez(tmp_path / 'inputs.npz', **batches)
  run_python(textwrap.dedent(f'''
      import jax, numpy as np
      exported = jax.export.deserialize(bytearray(open({str(output)!r}, 'rb').read()))
      inputs = np.load({str(tmp_path / 'inputs.npz')!r})
      out = {{}}
      for key in inputs.files:
        result = exported.call(inputs[key].astype(np.float32))
        out.update({{f'{{key}}/{{name}}': np.asarray(v) for name, v in result.items()}})
      np.savez({str(tmp_path / 'outputs.npz')!r}, **out)
  '''), block=('deeplab_jax', 'flax', 'tensorflow'))
  config = config.copy_and_resolve_references()
  config.eval.scales = (0.75, 1.0)
  predict = jax.jit(export.prediction_fn(config, 'grouped', export.OUTPUTS))
  outputs = np.load(tmp_path / 'outputs.npz')
  for key, batch in batches.items():
    expected = predict(variables, jnp.asarray(batch, jnp.float32))
    assert outputs[f'{key}/SemanticLogits'].shape == (*batch.shape[:3], 3)
    assert relative_error(outputs[f'{key}/SemanticLogits'], expected[export.LOGITS]) < 1e-4
    np.testing.assert_array_equal(outputs[f'{key}/SemanticPredictions'],
                                  expected[export.PREDICTIONS])


def test_savedmodel_has_the_official_signature_and_loads_without_jax(setup, tmp_path):
  config_file, config, variables, workdir = setup
  output = tmp_path / 'saved_model'
  app.call(export_tool, [f'--config={config_file}', f'--workdir={workdir}', '--format=savedmodel',
                         f'--output={output}', '--outputs=' + ','.join(export.OUTPUTS)])
  test_images = images()
  np.savez(tmp_path / 'inputs.npz', *test_images)
  result = run_python(textwrap.dedent(f'''
      import numpy as np, tensorflow as tf
      serve = tf.saved_model.load({str(output)!r}).signatures['serving_default']
      spec = serve.structured_input_signature[1]['ImageTensor']
      print(spec.dtype.name, spec.shape.as_list(), sorted(serve.structured_outputs))
      inputs = np.load({str(tmp_path / 'inputs.npz')!r})
      out = {{}}
      for i, key in enumerate(inputs.files):
        result = serve(ImageTensor=tf.constant(inputs[key][None]))
        out.update({{f'{{i}}/{{name}}': v.numpy() for name, v in result.items()}})
      np.savez({str(tmp_path / 'outputs.npz')!r}, **out)
  '''), block=('jax', 'jaxlib', 'flax', 'deeplab_jax'))
  assert result.stdout.split('\n')[-2] == ('uint8 [1, None, None, 3] [\'SemanticLogits\', '
                                           '\'SemanticPredictions\', \'SemanticProbabilities\']')
  reference = export.jax_runner(config, variables)
  outputs = np.load(tmp_path / 'outputs.npz')
  classes = set()
  for i, image in enumerate(test_images):
    expected = reference(image)
    labels = outputs[f'{i}/SemanticPredictions']
    assert labels.dtype == np.int32 and labels.shape == (1, *image.shape[:2])
    np.testing.assert_array_equal(labels[0], expected[export.PREDICTIONS])
    for name in (export.LOGITS, export.PROBABILITIES):
      assert relative_error(outputs[f'{i}/{name}'][0], expected[name]) < 1e-4, name
    classes.update(np.unique(labels).tolist())
  assert len(classes) > 1  # The labels compared are not one constant class.


def test_tflite_float_and_int8_agree_with_the_jax_model(setup, tmp_path):
  _, config, variables, _ = setup
  import tensorflow as tf

  path = str(tmp_path / 'model.tflite')
  export.export_tflite(config, variables, path, outputs=(export.PREDICTIONS, export.LOGITS))
  interpreter = tf.lite.Interpreter(model_path=path)
  ops = {op['op_name'] for op in interpreter._get_ops_details()}
  assert 'DEPTHWISE_CONV_2D' in ops and not any(op.startswith(('Flex', 'CUSTOM')) for op in ops)
  model = export.TFLiteModel(path, (127.5,) * 3)
  assert model.input_size == CROP
  result = export.check(config, variables, model, images(SIZES[:2]))
  assert result['images'] == 2 and result['label_agreement'] >= 0.999
  assert result['max_relative_error'][export.LOGITS] < 1e-4
  with pytest.raises(ValueError, match='exceeds the TFLite input size'):
    model(images(SIZES[2:])[0])
  quantized = str(tmp_path / 'int8.tflite')
  export.export_tflite(config, variables, quantized, quantize='int8',
                       representative=images(SIZES * 3, seed=1))
  int8 = export.check(config, variables, export.TFLiteModel(quantized, (127.5,) * 3),
                      images(SIZES[:2]))
  assert export.artifact_bytes(quantized) < export.artifact_bytes(path)
  assert int8['label_agreement'] > 0.9, int8  # Reached: 0.977.


def test_savedmodel_from_a_converted_official_checkpoint(tmp_path):
  """Official TF1 names (MobileNetV2 dm 0.5) -> convert tf -> export savedmodel -> ImageTensor ->
  SemanticPredictions, the JAX model's labels."""
  values = reference_values(reference_shapes(MOBILENET_DM05_TSV))
  prefix = str(tmp_path / 'official' / 'model.ckpt')
  write_tf1_checkpoint(prefix, values)
  overrides = [f'--config={CONFIGS / "voc_mobilenetv2.py"}', '--config.model.width_multiplier=0.5',
               '--config.eval.crop_size=(33,33)']
  app.call(convert_tool, ['tf', f'--checkpoint={prefix}', f'--output={tmp_path / "wd"}',
                          *overrides])
  output = tmp_path / 'saved_model'
  app.call(export_tool, [f'--workdir={tmp_path / "wd"}', '--format=savedmodel',
                         f'--output={output}', '--platforms=cpu', *overrides])
  import tensorflow as tf

  serve = tf.saved_model.load(str(output)).signatures['serving_default']
  image = images([(30, 25)])[0]
  result = serve(ImageTensor=tf.constant(image[None]))
  assert set(result) == {'SemanticPredictions', 'SemanticProbabilities'}
  labels = result['SemanticPredictions'].numpy()
  assert labels.dtype == np.int32 and labels.shape == (1, 30, 25)
  config = load_config(CONFIGS / 'voc_mobilenetv2.py', width_multiplier=0.5)
  config.eval.crop_size = (33, 33)
  variables, _ = checkpoint.restore_variables(tmp_path / 'wd')
  expected = export.jax_runner(config, variables)(image)
  np.testing.assert_array_equal(labels[0], expected[export.PREDICTIONS])
  assert relative_error(result['SemanticProbabilities'].numpy()[0],
                        expected[export.PROBABILITIES]) < 1e-4


def test_symbolic_sizes_refuse_scales_they_cannot_compute_exactly():
  h, w = jax.export.symbolic_shape('h, w')
  assert inference.scaled_size((h, w), 0.75) == ((h - 1) * 3 // 4 + 1, (w - 1) * 3 // 4 + 1)
  assert inference.scaled_size((513, 513), 0.75) == (385, 385)
  with pytest.raises(ConfigError, match='scale 0.1 cannot resize a symbolic image size'):
    inference.scaled_size((h, w), 0.1)
