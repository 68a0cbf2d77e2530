"""The Keras side of the model: the seed's Sequential config, its compile settings, and which
Flax layer holds which Keras layer's weights, in the two file formats written.

`.h5`: tf-keras 2's legacy HDF5 layout (InputLayer with `batch_input_shape`, plain-string
dtypes, explicit padding/strides/data_format, no `module`/`registered_name` keys), which both
Keras 3 and tf-keras 2 load. `.keras`: Keras 3's native zip, whose config.json is the same
model with `module`/`registered_name` on every object and whose model.weights.h5 keeps each
layer's variables under `layers/<name>/vars/<i>`. Version-specific keys (DTypePolicy objects,
`quantization_config`, ...) are left out so that any Keras 3 reads it with its defaults.

Both hold only standard layers: nothing that makes Keras run code. Layer and weight names
follow Keras' defaults, so the files look like the seed's own. The model's input is flat: 784
float values in [0, 1] (the seed's x_train / 255).
"""

from flax_mnist import geometry

EXPORT_NAME = 'keras_cnn.h5'  # The seed's file name.
KERAS_VERSION = '2.15.0'  # The layout written (tf-keras 2); Keras 3 reads it as legacy h5.
KERAS3_VERSION = '3.0.0'  # metadata.json of a .keras: the format's first version (not checked).
KERAS3_WEIGHTS = 'model.weights.h5'  # The .keras member holding the weights.
KERAS3_MEMBERS = ('metadata.json', 'config.json', KERAS3_WEIGHTS)  # Keras' order; no assets.
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
      {'class_name': 'InputLayer', 'config': {'batch_input_shape': [None, geometry.PIXELS],
                                              'dtype': 'float32', 'sparse': False,
                                              'ragged': False, 'name': 'input_1'}},
      _layer('Reshape', 'reshape', target_shape=list(geometry.IMAGE_SHAPE)),
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


def keras3_weight_path(name: str, index: int) -> str:
  """Where Keras 3 keeps variable `index` (0 kernel, 1 bias) of layer `name` in model.weights.h5.

  Keras names these groups after the layer's class in snake case, numbered per model
  (conv2d, conv2d_1, ...), not after the layer's own name, so they are the same in every file
  of this architecture.
  """
  return f'layers/{name}/vars/{index}'


def _keras3_object(module: str, entry: dict) -> dict:
  return {'module': module, 'class_name': entry['class_name'], 'config': entry['config'],
          'registered_name': None}


def _keras3_layer(entry: dict) -> dict:
  config = dict(entry['config'])
  if entry['class_name'] == 'InputLayer':
    config = {'batch_shape': config['batch_input_shape'], 'dtype': config['dtype'],
              'sparse': False, 'name': 'input_layer'}
  for key in ('kernel_initializer', 'bias_initializer'):
    if key in config:
      config[key] = _keras3_object('keras.initializers', config[key])
  return _keras3_object('keras.layers', {'class_name': entry['class_name'], 'config': config})


def keras3_config(config) -> dict:
  """config.json of the .keras file: the same Sequential, compiled as the seed compiled it."""
  layers = [_keras3_layer(entry) for entry in model_config(config)['config']['layers']]
  legacy_adam = training_config(config)['optimizer_config']
  adam = _keras3_object('keras.optimizers', {'class_name': 'Adam', 'config': {
      **legacy_adam['config'], 'name': 'adam'}})
  return {'module': 'keras', 'class_name': 'Sequential', 'registered_name': None,
          'config': {'name': 'sequential', 'trainable': True, 'dtype': 'float32',
                     'layers': layers, 'build_input_shape': [None, geometry.PIXELS]},
          'build_config': {'input_shape': [None, geometry.PIXELS]},
          'compile_config': {'optimizer': adam, 'loss': 'categorical_crossentropy',
                             'loss_weights': None, 'metrics': ['accuracy'],
                             'weighted_metrics': None}}
