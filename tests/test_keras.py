"""Keras HDF5 (flax_mnist/keras/): our export loads in Keras 3 and tf-keras 2; Keras-written
files import."""

import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import base_config
from flax_mnist import loop, model as model_lib, modes
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


def _flax_probabilities(model, images):
  return np.asarray(jax.nn.softmax(model(images)))


def _load(module_name, path):
  keras = pytest.importorskip(module_name)
  return keras.models.load_model(str(path))


@pytest.mark.parametrize('keras_module', ['keras', 'tf_keras'])
def test_export_loads_in_keras_with_equal_predictions(trained_workdir, test_images,
                                                      prepared_data_dir, keras_module):
  from conftest import small_config
  config = small_config(prepared_data_dir)
  restored = modes.restore(config, plan_lib.decide(config), str(trained_workdir), 'latest')
  flax_model = loop.nnx_model(restored.graphdef, restored.state)
  path = trained_workdir / keras_export.EXPORT_NAME  # Written by training, as the seed does.
  keras_model = _load(keras_module, path)
  images, _ = test_images
  keras_probs = keras_model.predict(images, batch_size=1000, verbose=0)
  flax_probs = _flax_probabilities(flax_model, images)
  assert keras_probs.shape == (10000, 10)
  assert np.abs(keras_probs - flax_probs).max() <= 1e-5
  np.testing.assert_array_equal(keras_probs.argmax(1), flax_probs.argmax(1))
  assert keras_model.count_params() == 1_199_882


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
  fresh = loop.train_and_evaluate(small_config(prepared_data_dir, num_epochs=1),
                                  str(tmp_path / 'fresh'))
  warm = loop.train_and_evaluate(config, str(tmp_path / 'warm'), plan)
  assert f'Starting from the weights in {h5}' in capsys.readouterr().out
  assert warm[0]['val_accuracy'] > fresh[0]['val_accuracy']
