"""Keras files (flax_mnist/keras/): our .h5 loads in Keras 3 and tf-keras 2, our .keras in
Keras 3 with safe_mode; Keras-written files of both formats import; bad ones fail in one line."""

import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import io
import json
import warnings
import zipfile

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import base_config
from flax_mnist import loop, model as model_lib, modes, schema
from flax_mnist import plan as plan_lib
from flax_mnist.data import idx
from flax_mnist.keras import export as keras_export
from flax_mnist.keras import weights as keras_weights
from flax_mnist.reporting import jsonl


@pytest.fixture(scope='module')
def test_images(mnist_dir):
  images, labels = idx.read_split(mnist_dir, 'test')
  return images.reshape(-1, 784).astype(np.float32) / 255.0, labels


def _cnn(config):
  """A fresh CNN of `config` (initial weights), planned for the CPU."""
  return model_lib.CNN(config, plan_lib.make(config, 'cpu', 1), rngs=nnx.Rngs(params=0))


def _flax_probabilities(model, images, chunk=500):
  """The model's probabilities, compiled and chunk images at a time (eager on all 10,000 at
  once, Winograd's tiles alone take gigabytes)."""
  graphdef, state = nnx.split(model)
  probabilities = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(x)))
  return np.concatenate([np.asarray(probabilities(state, images[i:i + chunk]))
                         for i in range(0, len(images), chunk)])


def _load(module_name, path):
  keras = pytest.importorskip(module_name)
  return keras.models.load_model(str(path))


def _assert_predicts_as_flax(keras_model, test_images, flax_probs):
  """The Keras model gives the Flax model's probabilities (1e-5) and digits on all 10,000."""
  keras_probs = keras_model.predict(test_images[0], batch_size=1000, verbose=0)
  assert keras_probs.shape == (10000, 10)
  assert np.abs(keras_probs - flax_probs).max() <= 1e-5
  np.testing.assert_array_equal(keras_probs.argmax(1), flax_probs.argmax(1))
  assert keras_model.count_params() == 1_199_882


def _trained_flax_model(trained_workdir, prepared_data_dir):
  from conftest import small_config
  config = small_config(prepared_data_dir)
  restored = modes.restore(config, plan_lib.decide(config), str(trained_workdir), 'latest')
  return loop.nnx_model(restored.graphdef, restored.state)


@pytest.fixture(scope='module')
def trained_probabilities(trained_workdir, prepared_data_dir, test_images):
  """The trained run's Flax probabilities on all 10,000 test images (computed once)."""
  return _flax_probabilities(_trained_flax_model(trained_workdir, prepared_data_dir),
                             test_images[0])


@pytest.mark.parametrize('keras_module', ['keras', 'tf_keras'])
def test_export_loads_in_keras_with_equal_predictions(trained_workdir, test_images,
                                                      trained_probabilities, keras_module):
  path = trained_workdir / keras_export.EXPORT_NAME  # Written by training, as the seed does.
  _assert_predicts_as_flax(_load(keras_module, path), test_images, trained_probabilities)


def test_export_has_no_code_and_the_seed_layout(tmp_path):
  config = base_config(kernel_size=5)
  model = _cnn(config)
  path = keras_export.export_h5(model, config, tmp_path / 'm.h5')
  with h5py.File(path) as f:
    text = f.attrs['model_config']
    assert 'Lambda' not in text and '"module"' not in text and 'registered_name' not in text
    assert '"batch_input_shape": [null, 784]' in text
    assert list(f['model_weights/conv2d_1/conv2d_1/kernel:0'].shape) == [5, 5, 32, 64]
  assert not (tmp_path / 'm.h5.partial').exists()


def test_export_needs_an_h5_name(tmp_path):
  config = base_config()
  with pytest.raises(ValueError, match='needs a .h5 or .hdf5 name'):
    keras_export.export_h5(_cnn(config), config, tmp_path / 'model.keras')


def test_export_names_a_known_format_before_restoring(tmp_path):
  config = base_config()
  with pytest.raises(keras_export.ExportNameError, match=r'\.h5 or \.hdf5 name .* or a \.keras'):
    keras_export.export(_cnn(config), config, tmp_path / 'model.txt')
  with pytest.raises(keras_export.ExportNameError,
                     match=r'MODEL\.H5: write the suffix in lower case \(MODEL\.h5\)'):
    keras_export.check_name(tmp_path / 'MODEL.H5')
  assert not list(tmp_path.iterdir())
  (tmp_path / 'taken.h5').mkdir()  # A folder in the way: one line, no .partial file left.
  with pytest.raises(keras_export.ExportNameError, match=r'taken\.h5: is a folder; pass a file '):
    keras_export.export(_cnn(config), config, tmp_path / 'taken.h5')
  assert [p.name for p in tmp_path.iterdir()] == ['taken.h5']
  with pytest.raises(keras_export.ExportNameError):  # Not "no checkpoint": checked first.
    modes.run_export(config, plan_lib.decide(config), str(tmp_path / 'empty'), 'latest',
                     str(tmp_path / 'model.keras5'))


@pytest.fixture(scope='module')
def exported_keras(trained_workdir, prepared_data_dir, tmp_path_factory):
  """The trained run exported by --mode=export --output=model.keras."""
  from conftest import small_config
  config = small_config(prepared_data_dir)
  path = tmp_path_factory.mktemp('native') / 'model.keras'
  assert modes.run_export(config, plan_lib.decide(config), str(trained_workdir), 'latest',
                          str(path)) == [path]
  return path


def test_keras_export_loads_in_keras3_safe_mode_with_equal_predictions(
    exported_keras, test_images, trained_probabilities):
  keras = pytest.importorskip('keras')
  assert keras.__version__.startswith('3.')
  keras_model = keras.models.load_model(str(exported_keras), safe_mode=True)
  _assert_predicts_as_flax(keras_model, test_images, trained_probabilities)
  assert keras_model.optimizer.__class__.__name__ == 'Adam'  # Compiled as the seed compiled it.


def test_keras_export_holds_keras3_members_and_no_code(exported_keras):
  with zipfile.ZipFile(exported_keras) as archive:
    assert archive.namelist() == ['metadata.json', 'config.json', 'model.weights.h5']
    text = archive.read('config.json').decode()
    assert json.loads(archive.read('metadata.json'))['keras_version'].startswith('3.')
  config = json.loads(text)
  assert (config['module'], config['class_name']) == ('keras', 'Sequential')
  assert all(layer['module'] == 'keras.layers' and layer['registered_name'] is None
             for layer in config['config']['layers'])
  assert 'Lambda' not in text and '"batch_shape": [null, 784]' in text
  assert not list(exported_keras.parent.glob('*.partial'))


def _params(model):
  return [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_keras_export_round_trip_and_init_from(exported_keras, trained_workdir,
                                               prepared_data_dir, tmp_path):
  from conftest import small_config
  flax_model = _trained_flax_model(trained_workdir, prepared_data_dir)
  model = _cnn(base_config())
  keras_weights.load_weights(model, exported_keras)
  for ours, imported in zip(_params(flax_model), _params(model), strict=True):
    np.testing.assert_array_equal(ours, imported)
  config = small_config(prepared_data_dir, init_from=str(exported_keras))
  schema.validate(config)
  row = modes.run_eval(config, plan_lib.decide(config), str(tmp_path / 'eval'), 'latest')
  assert row['val_accuracy'] == jsonl.read(trained_workdir / jsonl.METRICS_FILE)[-1][
      'val_accuracy']


def _zip(target, members):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # zipfile warns of the duplicate name case.
    with zipfile.ZipFile(target, 'w', zipfile.ZIP_DEFLATED) as z:
      for name, data in members:
        z.writestr(name, data)


def _bad_keras_file(kind, exported, folder, limit):
  """A .keras file damaged in way `kind`, made from the good export `exported`."""
  path = folder / f'{kind}.keras'
  data = exported.read_bytes()
  with zipfile.ZipFile(exported) as archive:
    good = [(name, archive.read(name)) for name in archive.namelist()]
  weights = good[2][1]
  if kind == 'extra_member':
    _zip(path, good + [('../evil.py', b'import os')])
  elif kind == 'assets':
    _zip(path, good + [('assets/vocabulary.txt', b'a')])
  elif kind == 'duplicate':
    _zip(path, good + [good[2]])
  elif kind == 'no_weights':
    _zip(path, good[:2])
  elif kind == 'bomb':  # Declares more than this model can need; deflates from ~60 KB.
    _zip(path, good[:2] + [('model.weights.h5', bytes(limit + 1))])
  elif kind == 'not_hdf5_inside':
    _zip(path, good[:2] + [('model.weights.h5', b'not hdf5')])
  elif kind == 'external_link':
    buffer = io.BytesIO()
    with h5py.File(buffer, 'w') as f:
      f['layers'] = h5py.ExternalLink(str(folder / 'other.h5'), '/layers')
    _zip(path, good[:2] + [('model.weights.h5', buffer.getvalue())])
  elif kind == 'hdf5':
    path.write_bytes(weights)
  elif kind == 'truncated':
    path.write_bytes(data[:len(data) // 2])
  elif kind == 'flipped':  # Stored, so the bytes are the weights': the CRC catches the change.
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes(b ^ 0xff for b in data[middle:middle + 64])
                     + data[middle + 64:])
  return path


@pytest.mark.parametrize('kind, message', [
    ('extra_member', "unexpected zip members '../evil.py'"),
    ('assets', "unexpected zip members 'assets/vocabulary.txt'"),
    ('duplicate', "unexpected zip members 'model.weights.h5'"),
    ('no_weights', 'no model.weights.h5 in the zip'),
    ('bomb', 'model.weights.h5 declares'),
    ('not_hdf5_inside', 'damaged or not a Keras 3 .keras file'),
    ('external_link', 'is a ExternalLink; only plain'),
    ('hdf5', 'is not a zip; init_from needs a .keras file as Keras 3 writes it'),
    ('truncated', 'is not a zip'),
    ('flipped', 'damaged or not a Keras 3 .keras file (BadZipFile: Bad CRC-32'),
])
def test_keras_import_refuses_bad_files_in_one_line(exported_keras, tmp_path, kind, message):
  model = _cnn(base_config())
  before = _params(model)
  path = _bad_keras_file(kind, exported_keras, tmp_path, keras_weights.size_limit(model))
  with pytest.raises(keras_weights.KerasImportError) as raised:
    keras_weights.load_weights(model, path)
  text = str(raised.value)
  assert '\n' not in text and text.startswith(str(path)) and message in text, text
  for old, new in zip(before, _params(model), strict=True):
    np.testing.assert_array_equal(old, new)


def test_keras_import_names_the_format_a_misnamed_file_has(exported_keras, trained_workdir,
                                                            tmp_path):
  zip_as_h5 = tmp_path / 'model.h5'
  zip_as_h5.write_bytes(exported_keras.read_bytes())
  with pytest.raises(keras_weights.KerasImportError, match='It is a zip: .* Name it .keras'):
    keras_weights.load_weights(_cnn(base_config()), zip_as_h5)
  h5_as_keras = tmp_path / 'model.keras'
  h5_as_keras.write_bytes((trained_workdir / keras_export.EXPORT_NAME).read_bytes())
  with pytest.raises(keras_weights.KerasImportError, match='It is HDF5: name it .h5'):
    keras_weights.load_weights(_cnn(base_config()), h5_as_keras)


def test_keras_import_rejects_another_architecture(exported_keras):
  with pytest.raises(keras_weights.KerasImportError,
                     match=r"layer 'conv2d' has weights of shapes \[\(3, 3, 1, 32\), \(32,\)\]; "
                           r"this model's 'conv2d' needs \[\(5, 5, 1, 32\), \(32,\)\]"):
    keras_weights.load_weights(_cnn(base_config(kernel_size=5)), exported_keras)


def _seed_keras_model(keras, kernel_size=3):
  layers = keras.layers
  model = keras.Sequential([
      keras.Input(shape=(784,)), layers.Reshape((28, 28, 1)),
      layers.Conv2D(32, kernel_size, activation='relu'),
      layers.Conv2D(64, kernel_size, activation='relu'), layers.MaxPool2D(2),
      layers.Dropout(0.25), layers.Flatten(), layers.Dense(128, activation='relu'),
      layers.Dropout(0.5), layers.Dense(10, activation='softmax')])
  model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
  return model


def test_import_keras3_native_and_weights_files(tmp_path, test_images):
  """A .keras and a .weights.h5 that Keras 3 itself saved, after a training step (so they hold
  Adam's state too), import with Keras' predictions (on 1,000 images; the export test covers
  all 10,000)."""
  keras = pytest.importorskip('keras')
  assert keras.__version__.startswith('3.')
  images, labels = test_images
  images = images[:1000]
  keras_model = _seed_keras_model(keras)
  keras_model.fit(images[:250], np.eye(10)[labels[:250]], batch_size=250, epochs=1, verbose=0)
  keras_model.save(str(tmp_path / 'seed.keras'))
  keras_model.save_weights(str(tmp_path / 'seed.weights.h5'))
  native, weights_only = _cnn(base_config()), _cnn(base_config())
  keras_weights.load_weights(native, tmp_path / 'seed.keras')
  keras_weights.load_weights(weights_only, tmp_path / 'seed.weights.h5')
  keras_probs = keras_model.predict(images, batch_size=1000, verbose=0)
  flax_probs = _flax_probabilities(native, images)
  assert np.abs(flax_probs - keras_probs).max() <= 1e-5
  np.testing.assert_array_equal(flax_probs.argmax(1), keras_probs.argmax(1))
  for a, b in zip(_params(native), _params(weights_only), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('keras_module', ['keras', 'tf_keras'])
def test_import_keras_trained_seed_model(tmp_path, test_images, keras_module):
  keras = pytest.importorskip(keras_module)
  images, labels = test_images
  keras_model = _seed_keras_model(keras)
  keras_model.fit(images[:1000], np.eye(10)[labels[:1000]], batch_size=250, epochs=1,
                  verbose=0)
  path = tmp_path / 'keras_cnn.h5'
  keras_model.save(str(path))
  model = _cnn(base_config())
  keras_weights.load_weights(model, path)
  keras_probs = keras_model.predict(images, batch_size=1000, verbose=0)
  assert np.abs(_flax_probabilities(model, images) - keras_probs).max() <= 1e-5


def test_import_rejects_another_architecture(trained_workdir):
  model = _cnn(base_config(kernel_size=5))
  with pytest.raises(keras_weights.KerasImportError,
                     match=r"layer 'conv2d' has weights of shapes \[\(3, 3, 1, 32\), \(32,\)\]; "
                           r"this model's 'conv2d' needs \[\(5, 5, 1, 32\), \(32,\)\]"):
    keras_weights.load_weights(model, trained_workdir / keras_export.EXPORT_NAME)


def test_import_rejects_non_hdf5(tmp_path):
  path = tmp_path / 'fake.h5'
  path.write_text('not hdf5')
  model = _cnn(base_config())
  with pytest.raises(keras_weights.KerasImportError, match='fake.h5 is not an HDF5 file'):
    keras_weights.load_weights(model, path)


def test_import_refuses_external_links(tmp_path, trained_workdir):
  path = tmp_path / 'linked.h5'
  with h5py.File(path, 'w') as f:
    f['model_weights'] = h5py.ExternalLink(str(trained_workdir / keras_export.EXPORT_NAME),
                                           '/model_weights')
  model = _cnn(base_config())
  with pytest.raises(keras_weights.KerasImportError, match='is a ExternalLink; only plain'):
    keras_weights.load_weights(model, path)


def test_init_from_starts_eval_and_training_from_the_file(trained_workdir, prepared_data_dir,
                                                          tmp_path, capsys):
  from conftest import small_config
  h5 = str(trained_workdir / keras_export.EXPORT_NAME)
  config = small_config(prepared_data_dir, init_from=h5, num_epochs=1)
  plan = plan_lib.decide(config)
  row = modes.run_eval(config, plan, str(tmp_path / 'eval'), 'latest')  # No checkpoint: the .h5.
  recorded = jsonl.read(trained_workdir / jsonl.METRICS_FILE)[-1]
  assert row['val_accuracy'] == recorded['val_accuracy']
  assert jsonl.read(tmp_path / 'eval' / 'eval.jsonl') == [row] and row['init_from'] == h5
  fresh = loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1),
                                  str(tmp_path / 'fresh'))
  warm = loop.train_and_evaluate(config, str(tmp_path / 'warm'), plan)
  assert f'Starting from the weights in {h5}' in capsys.readouterr().out
  assert warm[0]['val_accuracy'] > fresh[0]['val_accuracy']
