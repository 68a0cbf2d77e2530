"""Writes the model as a Keras HDF5 file (the seed's `keras_cnn.h5`) with h5py alone.

The file uses the tf-keras 2 layout of Keras' legacy HDF5 format (InputLayer with
`batch_input_shape`, plain-string dtypes, explicit padding/strides/data_format, no
`module`/`registered_name` keys), which both Keras 3 and tf-keras 2 load with
`keras.models.load_model`. It holds only standard layers: nothing that makes Keras run code.
Layer and weight names follow Keras' defaults, so the file looks like the seed's own.
"""

import json
import pathlib

import h5py
import numpy as np

from flax_mnist import model as model_lib

KERAS_VERSION = '2.15.0'  # The layout written (tf-keras 2); Keras 3 reads it as legacy h5.
# Flax submodule -> Keras layer name, in Keras' order of layers that hold weights.
WEIGHT_LAYERS = (('conv1', 'conv2d'), ('conv2', 'conv2d_1'), ('dense1', 'dense'),
                 ('dense2', 'dense_1'))
_GLOROT = {'class_name': 'GlorotUniform', 'config': {'seed': None}}
_ZEROS = {'class_name': 'Zeros', 'config': {}}


def _layer(class_name: str, name: str, **config) -> dict:
  return {'class_name': class_name,
          'config': {'name': name, 'trainable': True, 'dtype': 'float32', **config}}


def _weights_config(activation: str) -> dict:
  return dict(activation=activation, use_bias=True, kernel_initializer=_GLOROT,
              bias_initializer=_ZEROS, kernel_regularizer=None, bias_regularizer=None,
              activity_regularizer=None, kernel_constraint=None, bias_constraint=None)


def _conv(name: str, filters: int, k: int) -> dict:
  return _layer('Conv2D', name, filters=filters, kernel_size=[k, k], strides=[1, 1],
                padding='valid', data_format='channels_last', dilation_rate=[1, 1], groups=1,
                **_weights_config('relu'))


def model_config(config) -> dict:
  """The Keras Sequential config of the seed model for `config` (softmax output, as the seed)."""
  k = config.kernel_size
  layers = [
      {'class_name': 'InputLayer', 'config': {'batch_input_shape': [None, 784],
                                              'dtype': 'float32', 'sparse': False,
                                              'ragged': False, 'name': 'input_1'}},
      _layer('Reshape', 'reshape', target_shape=[28, 28, 1]),
      _conv('conv2d', config.conv1_features, k),
      _conv('conv2d_1', config.conv2_features, k),
      _layer('MaxPooling2D', 'max_pooling2d', pool_size=[2, 2], padding='valid',
             strides=[2, 2], data_format='channels_last'),
      _layer('Dropout', 'dropout', rate=config.conv_dropout, noise_shape=None, seed=None),
      _layer('Flatten', 'flatten', data_format='channels_last'),
      _layer('Dense', 'dense', units=config.dense_features, **_weights_config('relu')),
      _layer('Dropout', 'dropout_1', rate=config.dense_dropout, noise_shape=None, seed=None),
      _layer('Dense', 'dense_1', units=config.num_classes, **_weights_config('softmax')),
  ]
  return {'class_name': 'Sequential', 'config': {'name': 'sequential', 'layers': layers}}


def training_config(config) -> dict:
  """The seed's compile(optimizer='adam', loss='categorical_crossentropy', metrics=[...])."""
  adam = {'class_name': 'Adam', 'config': {
      'name': 'Adam', 'learning_rate': config.learning_rate, 'beta_1': config.adam_b1,
      'beta_2': config.adam_b2, 'epsilon': config.adam_eps, 'amsgrad': False}}
  return {'loss': 'categorical_crossentropy', 'metrics': ['accuracy'],
          'weighted_metrics': None, 'loss_weights': None, 'sample_weight_mode': None,
          'optimizer_config': adam}


def _strings(names: list[str]) -> np.ndarray:
  return np.array([n.encode('utf8') for n in names], dtype='S')


def export_h5(model: model_lib.CNN, config, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to `path` (.h5/.hdf5) as a Keras model file; returns the path.

  Written to a temporary name first and renamed, so an existing file is never left half
  overwritten.
  """
  path = pathlib.Path(path)
  if path.suffix not in ('.h5', '.hdf5'):
    raise ValueError(f'{path}: Keras needs a .h5 or .hdf5 name for an HDF5 model.')
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  with h5py.File(partial, 'w') as f:
    f.attrs['keras_version'] = KERAS_VERSION
    f.attrs['backend'] = 'tensorflow'
    f.attrs['model_config'] = json.dumps(model_config(config))
    f.attrs['training_config'] = json.dumps(training_config(config))
    weights = f.create_group('model_weights')
    weights.attrs['keras_version'] = KERAS_VERSION
    weights.attrs['backend'] = 'tensorflow'
    weights.attrs['layer_names'] = _strings([r[0] for r in model_lib.layer_table(config)])
    for name, *_ in model_lib.layer_table(config):
      weights.create_group(name).attrs['weight_names'] = _strings([])
    for attr, name in WEIGHT_LAYERS:
      layer = getattr(model, attr)
      group = weights[name]
      group.attrs['weight_names'] = _strings([f'{name}/kernel:0', f'{name}/bias:0'])
      inner = group.create_group(name)
      inner.create_dataset('kernel:0', data=np.asarray(layer.kernel[...], np.float32))
      inner.create_dataset('bias:0', data=np.asarray(layer.bias[...], np.float32))
  partial.replace(path)
  return path
