"""The seed notebook's Keras program (3x3 run), in today's Keras 3, as the end-to-end peer.

  python benchmarks/seed_keras.py --idx_dir=../shared/data/mnist [--epochs=20]

Same model, Adam, batch 500, 20 epochs, validation on the 10,000 test images after each epoch,
and model.save('keras_cnn.h5') at the end, as in the notebook. The notebook read MNIST through
tensorflow.examples.tutorials (gone from TensorFlow); this reads the same IDX files directly.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--idx_dir', required=True)
  parser.add_argument('--epochs', type=int, default=20)
  args = parser.parse_args()
  from flax_mnist.data import idx
  train_x, train_y = idx.read_split(args.idx_dir, 'train')
  test_x, test_y = idx.read_split(args.idx_dir, 'test')
  train_x = train_x[:55000].reshape(-1, 784).astype(np.float32) / 255.0
  test_x = test_x.reshape(-1, 784).astype(np.float32) / 255.0
  train_y, test_y = np.eye(10)[train_y[:55000]], np.eye(10)[test_y]

  import keras
  from keras.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, Reshape
  np.random.seed(42)
  model = keras.Sequential()
  model.add(keras.Input(shape=(784,)))
  model.add(Reshape((28, 28, 1)))
  model.add(Conv2D(32, kernel_size=(3, 3), activation='relu', strides=(1, 1)))
  model.add(Conv2D(64, kernel_size=(3, 3), strides=(1, 1), activation='relu'))
  model.add(MaxPool2D(pool_size=(2, 2)))
  model.add(Dropout(0.25))
  model.add(Flatten())
  model.add(Dense(128, activation='relu'))
  model.add(Dropout(0.5))
  model.add(Dense(10, activation='softmax'))
  model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
  model.fit(train_x, train_y, epochs=args.epochs, batch_size=500,
            validation_data=(test_x, test_y), verbose=2)
  with tempfile.TemporaryDirectory() as folder:
    model.save(os.path.join(folder, 'keras_cnn.h5'))


if __name__ == '__main__':
  main()
