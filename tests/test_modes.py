"""--mode=eval/export/predict through the command line, on a trained workdir."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cpu_plan, small_config
from flax_mnist import modes
from flax_mnist.data import idx
from flax_mnist.data import images as images_lib
from flax_mnist.reporting import jsonl


def _cli(workdir, data_dir, *args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  small = ['--config.train_split=train[:1000]', '--config.eval_split=test[:600]',
           '--config.batch_size=200', '--config.eval_batch_size=200']
  return subprocess.run([sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
                         f'--workdir={workdir}', f'--config.data_dir={data_dir}', *small, *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_eval_reproduces_the_recorded_val_accuracy(trained_workdir, prepared_data_dir):
  """Also under another training command: fields that shape training, not the model, may
  differ from the checkpoint's where it is only read."""
  result = _cli(trained_workdir, prepared_data_dir, '--mode=eval', '--config.batch_size=100',
                '--config.learning_rate=0.01', '--config.seed=7', '--config.dense_dropout=0.1')
  assert result.returncode == 0, result.stderr[-2000:]
  recorded = jsonl.read(trained_workdir / 'metrics.jsonl')[-1]
  row = json.loads((trained_workdir / 'eval.jsonl').read_text().splitlines()[-1])
  assert row['val_accuracy'] == recorded['val_accuracy'] and row['epoch'] == 2
  assert row['requested'] == 'latest' and row['step'] == 10 and 'init_from' not in row
  assert f"val_accuracy: {recorded['val_accuracy']:.4f}" in result.stdout


def test_eval_of_missing_step_lists_the_steps(trained_workdir, prepared_data_dir):
  result = _cli(trained_workdir, prepared_data_dir, '--mode=eval', '--step=3')
  assert result.returncode == 2
  assert result.stderr.strip().endswith('available: 5, 10, latest, best.')


def test_eval_without_checkpoint_writes_nothing(tmp_path, prepared_data_dir):
  result = _cli(tmp_path / 'empty', prepared_data_dir, '--mode=eval')
  assert result.returncode == 2 and 'no checkpoint in' in result.stderr
  assert not (tmp_path / 'empty').exists()


def test_export_writes_the_requested_file(trained_workdir, prepared_data_dir, tmp_path, capsys):
  """Under other training flags too, the file records how the checkpoint was trained; a file
  already there is replaced, and the line says so."""
  out = tmp_path / 'exported.h5'
  result = _cli(trained_workdir, prepared_data_dir, '--mode=export', f'--output={out}',
                '--step=best', '--config.learning_rate=0.01', '--config.dense_dropout=0.1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert out.is_file() and f'to {out}\n' in result.stdout
  config = small_config(prepared_data_dir)
  modes.run_export(config, cpu_plan(config), str(trained_workdir), 'best', str(out))
  assert f'to {out} (replacing the file there)' in capsys.readouterr().out
  with h5py.File(out, 'r') as f:
    optimizer = json.loads(f.attrs['training_config'])['optimizer_config']['config']
    layers = json.loads(f.attrs['model_config'])['config']['layers']
  assert optimizer['learning_rate'] == 0.001
  assert [layer['config']['rate'] for layer in layers if 'rate' in layer['config']] == [0.25, 0.5]


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory, mnist_dir):
  """The first 8 test digits as PNGs: plain, upscaled RGB, and inverted JPEG variants."""
  folder = tmp_path_factory.mktemp('digits')
  images, _ = idx.read_split(mnist_dir, 'test')
  paths = []
  for i, image in enumerate(images[:8]):
    path = folder / f'digit{i}.png'
    Image.fromarray(image).save(path)
    paths.append(path)
  Image.fromarray(images[0]).convert('RGB').resize((112, 112)).save(folder / 'big_rgb.png')
  Image.fromarray(255 - images[1]).save(folder / 'paper.jpg', quality=95)
  (folder / 'notes.png').write_text('not an image')
  (folder / 'README.txt').write_text('not an image, and not named like one')
  (folder / 'older').mkdir()
  Image.fromarray(images[2]).save(folder / 'older' / 'digit2.png')  # Folders are not searched.
  return folder, paths, images[:8]


def test_predict_classifies_files_as_the_model_does_in_memory(trained_workdir,
                                                              prepared_data_dir, digit_files):
  folder, paths, images = digit_files
  config = small_config(prepared_data_dir)
  model = modes.restore(config, cpu_plan(config), str(trained_workdir), 'latest').model()
  expected = modes.classify(model, images / np.float32(255))
  result = _cli(trained_workdir, prepared_data_dir, '--mode=predict',
                f'--images={folder}/digit*.png')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()[-8:]
  for line, path, p in zip(lines, paths, expected):
    assert line == f'{path}: {int(p.argmax())} ({float(p.max()):.4f})'


def test_predict_reports_bad_files_and_classifies_the_rest(trained_workdir, prepared_data_dir,
                                                           digit_files):
  """A folder stands for its image files, by name; a file that is no image gets an error line."""
  folder, paths, _ = digit_files
  result = _cli(trained_workdir, prepared_data_dir, '--mode=predict',
                f'--images={folder},{folder}/missing.png')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-2:] == [
      f'error: {folder}/notes.png: not a readable image (UnidentifiedImageError); pass PNG or '
      'JPEG files.', f'error: {folder}/missing.png: no such file.']
  header, *lines = result.stdout.strip().splitlines()[1:]  # After the plan line.
  assert header == 'Predictions of step 10 (epoch 2):'
  classified = [line.split(': ')[0] for line in lines]
  assert classified == [str(folder / name) for name in ['big_rgb.png', *(p.name for p in paths),
                                                        'paper.jpg']]


def test_a_folder_stands_for_its_image_files(digit_files, tmp_path):
  folder, paths, _ = digit_files
  assert images_lib.expand_paths(f'{folder}/digit1.png, {folder}/') == [
      paths[1], folder / 'big_rgb.png', *paths, folder / 'notes.png', folder / 'paper.jpg']
  (tmp_path / 'empty').mkdir()
  with pytest.raises(images_lib.ImageError, match=r'/empty: a folder without image files \(\.png'):
    images_lib.expand_paths(str(tmp_path / 'empty'))
  # A glob names files: the folders it matches are left out.
  assert images_lib.expand_paths(f'{tmp_path}/*,{folder}/ol*') == []
  assert images_lib.expand_paths(f'{folder}/*.txt,{folder}/no*') == [folder / 'README.txt',
                                                                     folder / 'notes.png']


def test_load_image_converts_size_colour_and_inversion(digit_files):
  folder, paths, images = digit_files
  plain = images_lib.load_image(paths[0])
  np.testing.assert_allclose(plain, images[0] / 255.0, atol=1e-6)
  big = images_lib.load_image(folder / 'big_rgb.png')
  assert big.shape == (28, 28) and np.abs(big - plain).mean() < 0.05
  paper = images_lib.load_image(folder / 'paper.jpg', invert=True)
  assert np.abs(paper - images[1] / 255.0).mean() < 0.02
