"""flax_mnist/reporting/console.py: the epoch line's timing covers the samples it timed."""

from flax_mnist.reporting import console

_ROW = dict(epoch=1, loss=0.5, accuracy=0.9, val_loss=0.4, val_accuracy=0.91, seconds=1.2)


def test_a_whole_epoch_times_all_its_samples():
  line = console.epoch_line(_ROW, 3, 10_000)
  assert line.startswith('Epoch 1/3 - 10000 samples - 1.2s 120us/sample - loss: 0.5000')
  assert line == console.epoch_line(_ROW, 3, 10_000, 10_000)


def test_a_resumed_epoch_times_only_the_samples_trained_since():
  line = console.epoch_line(_ROW, 1, 10_000, 900)
  assert line.startswith('Epoch 1/1 - 10000 samples (900 since resuming) - 1.2s 1333us/sample')
