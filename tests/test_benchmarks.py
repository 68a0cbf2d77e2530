"""The benchmarks' own logic that needs no peer and no accelerator."""

import importlib.util
import sys

import numpy as np
import pytest

from conftest import REPO, small_config
from flax_mnist import input_pipeline

sys.path.insert(0, str(REPO / 'benchmarks'))
import accelerator  # noqa: E402


def _rows(split: input_pipeline.Split) -> set[bytes]:
  return {image.tobytes() + bytes([label]) for image, label in zip(split.images, split.labels)}


def test_without_tensorflow_the_idx_files_give_the_same_examples(prepared_data_dir, mnist_dir,
                                                                 monkeypatch):
  """tfds stores the examples in a hash-shuffled order; the IDX files in file order."""
  config = small_config(prepared_data_dir)
  tfds_test = input_pipeline.load_split(config, 'test')
  tfds_train = input_pipeline.load_split(config, 'train[:1000]')
  monkeypatch.setattr(input_pipeline, 'load_split', input_pipeline.load_split)  # Restored after.
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'tensorflow' else real_find_spec(name, *a))
  assert 'IDX files read directly' in accelerator.read_idx_splits_if_no_tensorflow(str(mnist_dir))
  idx_test = input_pipeline.load_split(config, 'test')
  idx_train = input_pipeline.load_split(config, 'train[:60000]')
  assert idx_test.images.shape == (10000, 28, 28, 1) and idx_test.labels.dtype == np.int32
  assert _rows(idx_test) == _rows(tfds_test)  # The same 10,000 test examples.
  assert _rows(tfds_train) <= _rows(idx_train)  # tfds' training examples come from the file.
  assert len(input_pipeline.load_split(config, 'train[:1000]')) == 1000
  with pytest.raises(SystemExit, match='only train'):
    input_pipeline.load_split(config, 'train[10%:]')


def test_with_tensorflow_the_tfds_path_stays(mnist_dir):
  before = input_pipeline.load_split
  assert accelerator.read_idx_splits_if_no_tensorflow(str(mnist_dir)).startswith('tfds')
  assert input_pipeline.load_split is before
