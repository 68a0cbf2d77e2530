"""The seed CNN's train step in each system the benchmark compares, behind one interface.

Each `make_*` returns run(steps) that takes `steps` Adam steps on one fixed batch of 500
(forward, backward, update) and blocks until they are done. Each peer uses its own fastest
ordinary path: Keras' compiled train function (`train_on_batch`), PyTorch eager and
`torch.compile`.
"""

import os

import numpy as np

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def train_args(plan, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
  """A train step's batch for `plan`: (images, labels), or when the plan pads the batch, both
  padded to its rows and the mask that leaves the padding out, as training feeds them."""
  if not plan.train_padding:
    return images, labels
  from flax_mnist.data import batches
  return next(batches.eval_batches(batches.Split(images, labels), len(labels),
                                   padded_size=plan.train_batch))


def make_flax_mnist(config, images, labels):
  from flax_mnist import host_memory
  host_memory.keep_freed_memory()  # As the command line does.
  import jax
  from flax_mnist import plan as plan_lib, sharding, steps
  plan = plan_lib.decide(config)  # As a training run plans on this machine.
  graphdef, state, tx = steps.create(config, plan)
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  train = steps.jit_train_step(graphdef, tx, mesh, plan, config)
  batch = sharding.put_batch(mesh, *train_args(plan, images, labels))
  holder = [state]

  def run(steps):
    for _ in range(steps):
      holder[0], metrics = train(holder[0], *batch)
    jax.block_until_ready(metrics)
  return run


def make_keras(config, images, labels):
  import keras
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  layers, k = keras.layers, config.kernel_size
  model = keras.Sequential([
      keras.Input(shape=(784,)), layers.Reshape((28, 28, 1)),
      layers.Conv2D(config.conv1_features, k, activation='relu'),
      layers.Conv2D(config.conv2_features, k, activation='relu'), layers.MaxPool2D(2),
      layers.Dropout(config.conv_dropout), layers.Flatten(),
      layers.Dense(config.dense_features, activation='relu'),
      layers.Dropout(config.dense_dropout), layers.Dense(10, activation='softmax')])
  model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                loss='sparse_categorical_crossentropy', metrics=['accuracy'])
  x = images.reshape(len(images), 784).astype(np.float32) / 255.0

  def run(steps):
    # train_on_batch runs Keras' compiled train function once and returns its logs as numbers,
    # so every step has finished when it returns. (Timing `fit` from a callback is wrong:
    # with the TensorFlow backend the callbacks run while steps are still in flight.)
    for _ in range(steps):
      model.train_on_batch(x, labels)
  return run


def _torch_model(config):
  import torch
  from torch import nn
  k = config.kernel_size
  side = (28 - 2 * (k - 1)) // 2
  return nn.Sequential(
      nn.Conv2d(1, config.conv1_features, k), nn.ReLU(),
      nn.Conv2d(config.conv1_features, config.conv2_features, k), nn.ReLU(), nn.MaxPool2d(2),
      nn.Dropout(config.conv_dropout), nn.Flatten(),
      nn.Linear(side * side * config.conv2_features, config.dense_features), nn.ReLU(),
      nn.Dropout(config.dense_dropout), nn.Linear(config.dense_features, 10)).to(torch.float32)


def make_torch(config, images, labels, compiled=False):
  import torch
  torch.manual_seed(config.seed)
  model = _torch_model(config)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                               betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
  x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
  y = torch.from_numpy(labels.astype(np.int64))
  loss_fn = torch.nn.functional.cross_entropy

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss
  step = torch.compile(step) if compiled else step

  def run(steps):
    for _ in range(steps):
      loss = step()
    loss.item()
  return run


def make_torch_compile(config, images, labels):
  return make_torch(config, images, labels, compiled=True)


SYSTEMS = {'flax_mnist': make_flax_mnist, 'keras': make_keras, 'torch': make_torch,
           'torch.compile': make_torch_compile}
PACKAGES = {'flax_mnist': 'jax', 'keras': 'keras', 'torch': 'torch', 'torch.compile': 'torch'}
