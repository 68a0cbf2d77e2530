"""The report: three PNGs after training, --mode=report, a confusion matrix that counts, and
predictions batched no larger than the split."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO, cpu_plan, small_config
from flax_mnist import loop, modes, sharding, steps
from flax_mnist.data import tfds_source
from flax_mnist.reporting import jsonl, report

PLOTS = ('curves.png', 'confusion_matrix.png', 'errors.png')


def _assert_pngs(folder):
  for name in PLOTS:
    path = folder / name
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name
    with Image.open(path) as image:
      width, height = image.size
      assert 500 <= width <= 2000 and 400 <= height <= 2000, (name, image.size)
      assert np.asarray(image.convert('L')).std() > 10, f'{name} looks blank'


def test_training_leaves_the_three_plots(trained_workdir):
  _assert_pngs(trained_workdir / report.PLOTS_DIR)


def test_report_mode_regenerates_the_plots(trained_workdir, prepared_data_dir):
  folder = trained_workdir / report.PLOTS_DIR
  for name in PLOTS:
    (folder / name).unlink()
  small = ['--config.train_split=train[:1000]', '--config.eval_split=test[:600]',
           '--config.batch_size=200', '--config.eval_batch_size=200']
  result = subprocess.run(
      [sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
       f'--workdir={trained_workdir}', f'--config.data_dir={prepared_data_dir}', *small,
       '--mode=report', '--step=best'], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Wrote curves.png, confusion_matrix.png, errors.png' in result.stdout
  _assert_pngs(folder)


def test_confusion_matrix_counts_the_in_memory_predictions(trained_workdir, prepared_data_dir):
  config = small_config(prepared_data_dir)
  restored = modes.restore(config, cpu_plan(config), str(trained_workdir), 'latest')
  graphdef, state = restored.graphdef, restored.state
  split = tfds_source.load_split(config, config.eval_split)
  probs = report.probabilities(graphdef, state.params, sharding.make_mesh(), split, 200)
  matrix = report.confusion_counts(split.labels, probs.argmax(-1), config.num_classes)
  expected = modes.classify(loop.nnx_model(graphdef, state), split.images / np.float32(255))
  np.testing.assert_allclose(probs, expected, atol=1e-5)
  assert matrix.sum() == len(split) == 600
  for true, predicted in [(3, 3), (5, 3), (7, 9)]:
    assert matrix[true, predicted] == np.sum((split.labels == true) &
                                             (expected.argmax(-1) == predicted))
  recorded = jsonl.read(trained_workdir / 'metrics.jsonl')[-1]['val_accuracy']
  np.testing.assert_allclose(np.trace(matrix) / 600, recorded, rtol=1e-6)


def test_worst_errors_are_the_least_likely_true_labels():
  labels = np.array([0, 1, 2, 0])
  probs = np.array([[.9, .1, 0], [.7, .2, .1], [.2, .75, .05], [.4, .6, 0]])
  np.testing.assert_array_equal(report.worst_errors(labels, probs), [2, 1, 3])
  np.testing.assert_array_equal(report.worst_errors(labels, probs, count=1), [2])


def test_a_huge_eval_batch_size_predicts_in_batches_of_the_split(prepared_data_dir,
                                                                  monkeypatch):
  """An eval_batch_size far above the split's size (100,000 rows: 50 GB of activations in one
  pass) is cut to the split's, with the same probabilities as predict's."""
  config = small_config(prepared_data_dir, eval_batch_size=100_000)
  graphdef, state, _ = steps.create(config, cpu_plan(config))
  split = tfds_source.load_split(config, config.eval_split)
  sizes, batched = [], report.batches.eval_batches

  def recording(split, batch_size, padded_size):
    sizes.append((batch_size, padded_size))
    return batched(split, batch_size, padded_size=padded_size)
  monkeypatch.setattr(report.batches, 'eval_batches', recording)
  probs = report.probabilities(graphdef, state.params, sharding.make_mesh(), split, 100_000)
  assert sizes == [(600, 600)]
  expected = modes.classify(loop.nnx_model(graphdef, state), split.images / np.float32(255))
  np.testing.assert_allclose(probs, expected, atol=1e-5)
