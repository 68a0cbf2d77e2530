"""flax_mnist/reporting/console.py: the epoch line's time per sample is its training's."""

from flax_mnist.reporting import console

# 1.2 s for the epoch, of which 1.0 s trained its 10,000 samples; validation took the rest.
_ROW = dict(epoch=1, loss=0.5, accuracy=0.9, val_loss=0.4, val_accuracy=0.91, seconds=1.2,
            samples_per_second=10_000)


def test_a_whole_epoch_times_its_samples_by_training_alone():
  line = console.epoch_line(_ROW, 3, 10_000)
  assert line.startswith('Epoch 1/3 - 10000 samples - 1.2s 100us/sample - loss: 0.5000')
  assert line == console.epoch_line(_ROW, 3, 10_000, 10_000)


def test_a_resumed_epoch_times_only_the_samples_trained_since():
  line = console.epoch_line(dict(_ROW, samples_per_second=900 / 0.9), 1, 10_000, 900)
  assert line.startswith('Epoch 1/1 - 10000 samples (900 since resuming) - 1.2s 1000us/sample')
