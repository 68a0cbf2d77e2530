"""The seed notebook's first run: 3x3 kernels, both dropouts, Adam, batch 500, 20 epochs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (every field the package reads lives here)."""
  config = ml_collections.ConfigDict()

  # Data. `dataset` is any tfds dataset of 28x28x1 images with 10 classes.
  config.dataset = 'mnist'
  config.data_dir = ''  # tfds data dir; '' means tfds' default (~/tensorflow_datasets).
  config.idx_dir = ''  # Folder with the four IDX files: prepares the tfds dataset offline.
  config.train_split = 'train[:55000]'  # The seed trains on 55,000 images.
  config.eval_split = 'test'  # Validated on all 10,000 test images after every epoch.

  # Model (the seed's Keras Sequential, layer for layer).
  config.kernel_size = 3
  config.conv1_features = 32
  config.conv2_features = 64
  config.dense_features = 128
  config.conv_dropout = 0.25
  config.dense_dropout = 0.5
  config.num_classes = 10
  # How convolutions are computed: 'winograd' (Winograd F(4x4, k x k) for k = 3 or 5, with a
  # hand-written backward pass: 4x (k=3) / 6.25x (k=5) fewer multiplies, fastest on CPU),
  # 'im2col' (shifted slices + one matmul), 'im2col_vjp' (the same with a hand-written backward
  # pass) or 'xla' (lax.conv_general_dilated: cuDNN on GPU, best on GPU/TPU). 'auto' picks per
  # backend and layer: on CPU winograd for conv2 (float32) and im2col_vjp for the 1-channel
  # conv1; on GPU im2col for conv1, else xla.
  config.conv_impl = 'auto'
  # Examples per micro-batch: gradients are summed over micro-batches of this size, one after
  # another, so activations stay in the CPU's cache. 0 = auto (on CPU, per device: 50 with the
  # Winograd conv2; with im2col_vjp 20 for k=3, 10 for k=5; with im2col 10 and 5; the whole
  # batch elsewhere). Changes speed, not the maths.
  config.micro_batch_size = 0
  # 'float32', or 'bfloat16': mixed precision, convolutions and dense layers computed in
  # bfloat16 while parameters, optimizer state, softmax and loss stay float32.
  config.dtype = 'float32'

  # Optimiser: Keras' Adam defaults.
  config.learning_rate = 1e-3
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-7

  # Training.
  config.batch_size = 500
  config.eval_batch_size = 1000
  config.num_epochs = 20
  config.seed = 42
  config.progress_bar = True  # Only drawn when stdout is a terminal.
  # TensorBoard (WORKDIR/tensorboard) gets every epoch's metrics, and the training loss and
  # accuracy of every N-th step; 0 logs epochs only.
  config.log_every_steps = 10
  # Keep the training split on the devices and run each epoch as one lax.scan: 'on', 'off',
  # or 'auto' (on for GPU/TPU with one process, off on CPU, where a step dwarfs a round trip).
  config.device_data = 'auto'

  # Several processes (multi-host): 'on' calls jax.distributed.initialize, 'off' never, 'auto'
  # when coordinator_address is set or the environment announces a multi-process job (e.g.
  # JAX_COORDINATOR_ADDRESS). Empty / 0 / -1 below: let JAX detect them (TPU pods, Slurm, MPI).
  config.distributed = 'auto'
  config.coordinator_address = ''  # HOST:PORT of process 0.
  config.num_processes = 0
  config.process_id = -1

  # Checkpoints (WORKDIR/checkpoints, saved after every epoch) and starting weights.
  config.keep_checkpoints = 3  # The newest N are kept, plus the best by val_accuracy.
  config.init_from = ''  # A Keras .h5 of the same architecture to start from (weights only).
  return config
