"""The run path without TensorFlow: data through tfds as array_record, read as numpy, giving the
same examples in the same order as the TensorFlow path; and every mode, end to end.

TensorFlow is hidden in a subprocess as an uninstalled package looks: a finder wrapping
sys.meta_path answers None for `tensorflow*`, so importlib.util.find_spec('tensorflow') is None
and `import tensorflow` raises ModuleNotFoundError. (`sys.modules['tensorflow'] = None` would
not do: etils, under tfds, takes `'tensorflow' in sys.modules` for TensorFlow being loaded, and
tfds then fails at import.) At exit, the prelude checks that TensorFlow was never imported and
is still unimportable, and says so on stdout.
"""

import json
import pathlib
import textwrap

import numpy as np
import pytest

from conftest import base_config, run_python
from flax_mnist.data import idx, tfds_source

pytestmark = pytest.mark.usefixtures('split_cache_off')  # These tests check the tfds paths.

PRELUDE = textwrap.dedent('''
    import atexit, importlib.util, os, sys

    class _NoTensorFlow:
      """Every finder of sys.meta_path, blind to tensorflow and its submodules."""

      def __init__(self, finders):
        self.finders = finders

      def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == 'tensorflow':
          return None
        for finder in self.finders:
          spec = finder.find_spec(name, path, target)
          if spec is not None:
            return spec
        return None

      def invalidate_caches(self):
        for finder in self.finders:
          getattr(finder, 'invalidate_caches', lambda: None)()

    sys.meta_path[:] = [_NoTensorFlow(list(sys.meta_path))]

    def _tensorflow_stayed_out():
      if 'tensorflow' in sys.modules or importlib.util.find_spec('tensorflow') is not None:
        print('TENSORFLOW GOT IN', flush=True)
        os._exit(99)
      print('TF-free to the end', flush=True)

    atexit.register(_tensorflow_stayed_out)
    ''')
TF_FREE = 'TF-free to the end'


def _run_tf_free(code: str, timeout: int = 600):
  result = run_python(PRELUDE + textwrap.dedent(code), timeout=timeout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert result.stdout.rstrip().endswith(TF_FREE), result.stdout[-2000:]
  return result


def _tf_arrays(data_dir, splits, **overrides) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The splits as the TensorFlow path reads them here: tfrecord through builder.as_dataset."""
  config = base_config(data_dir=str(data_dir), **overrides)
  assert tfds_source.has_tensorflow()
  assert not tfds_source.has_array_record(tfds_source.get_builder(config))  # Read by TF.
  arrays = {}
  for split in splits:
    loaded = tfds_source.load_split(config, split)
    arrays[split] = loaded.images, loaded.labels
  return arrays


_SAVE_SPLITS = '''
    import numpy as np
    from conftest import base_config
    from flax_mnist.data import prepare, tfds_source

    def save_splits(out, splits, **overrides):
      config = base_config(**overrides)
      assert not tfds_source.has_tensorflow()
      for n, split in enumerate(splits):
        loaded = tfds_source.load_split(config, split)
        np.save(f'{out}/images{n}.npy', loaded.images)
        np.save(f'{out}/labels{n}.npy', loaded.labels)
    '''


def _assert_same(out: pathlib.Path, expected: dict) -> None:
  for n, (split, (images, labels)) in enumerate(expected.items()):
    got_images, got_labels = np.load(out / f'images{n}.npy'), np.load(out / f'labels{n}.npy')
    assert got_images.dtype == images.dtype and got_labels.dtype == labels.dtype, split
    np.testing.assert_array_equal(got_labels, labels, err_msg=split)
    np.testing.assert_array_equal(got_images, images, err_msg=split)


def test_tf_free_splits_equal_the_tf_paths_example_by_example(tmp_path, prepared_data_dir,
                                                             mnist_dir):
  """The seed's splits, prepared offline without TensorFlow (array_record, PNG by PIL) and read
  as numpy, hold the TF path's images and labels in its order: a seeded run is unchanged."""
  splits = ('train[:55000]', 'test')
  out = tmp_path / 'out'
  out.mkdir()
  _run_tf_free(_SAVE_SPLITS + f'''
    save_splits({str(out)!r}, {splits!r}, data_dir={str(tmp_path / 'tfds')!r},
                idx_dir={str(mnist_dir)!r})
    ''')
  files = sorted(p.name for p in (tmp_path / 'tfds' / 'mnist' / '3.0.1').iterdir())
  assert 'mnist-train.array_record-00000-of-00001' in files
  assert not any('tfrecord' in name for name in files)
  _assert_same(out, _tf_arrays(prepared_data_dir, splits))


def test_tfrecord_data_dir_without_tf_fails_in_one_line_or_gets_array_record(tmp_path,
                                                                            tiny_idx_dir):
  """A data dir that the TF path prepared (tfrecord) stays TF's; without TF it fails in one
  line, or with idx_dir gains an array_record copy that reads as TF reads the tfrecord."""
  data_dir = tmp_path / 'tfds'
  expected = _tf_arrays(data_dir, ('train', 'test[10:60]'), idx_dir=str(tiny_idx_dir))
  out = tmp_path / 'out'
  out.mkdir()
  result = _run_tf_free(_SAVE_SPLITS + f'''
    from flax_mnist.errors import DataError
    try:
      save_splits({str(out)!r}, ['test'], data_dir={str(data_dir)!r})
    except DataError as e:
      print('error:', e)
    save_splits({str(out)!r}, {tuple(expected)!r}, data_dir={str(data_dir)!r},
                idx_dir={str(tiny_idx_dir)!r})
    ''')
  folder = data_dir / 'mnist' / '3.0.1'
  assert result.stdout.splitlines()[0] == (
      f"error: {folder} holds 'mnist' as tfrecord, which only TensorFlow reads, and TensorFlow "
      'is not installed; pass --config.idx_dir=FOLDER (the four IDX files) to add an '
      'array_record copy, pip install tensorflow-cpu, or pass another --config.data_dir.')
  assert f'Added array_record to mnist in {folder}' in result.stdout
  _assert_same(out, expected)
  info = json.loads((folder / 'dataset_info.json').read_text())
  assert info['fileFormat'] == 'tfrecord' and info['alternativeFileFormats'] == ['array_record']
  # TF still reads its tfrecord, and now takes the array_record copy: the same arrays.
  builder = tfds_source.get_builder(base_config(data_dir=str(data_dir)))
  import tensorflow_datasets as tfds
  tf_read = tfds.as_numpy(builder.as_dataset(split='test[10:60]', batch_size=-1))
  np.testing.assert_array_equal(tf_read['image'], expected['test[10:60]'][0])
  _assert_same(out, _tf_arrays_any(data_dir, tuple(expected)))


def _tf_arrays_any(data_dir, splits):
  config = base_config(data_dir=str(data_dir))
  return {split: (s.images, s.labels) for split in splits
          for s in [tfds_source.load_split(config, split)]}


def test_tf_free_download_goes_through_tfds_download_manager(tmp_path, tiny_idx_dir):
  """Without idx_dir and without TF, tfds' own download (its DownloadManager: here handing out
  local files, as no network is reached from tests) is written as array_record: the same
  examples as the TF path prepares from the same files."""
  expected = _tf_arrays(tmp_path / 'tf', ('train', 'test'), idx_dir=str(tiny_idx_dir))
  out = tmp_path / 'out'
  out.mkdir()
  files = {f'{split}_{kind}': str(tiny_idx_dir / f'{stem}.gz')
           for split, stems in (('train', idx.SPLIT_FILES['train']),
                                ('test', idx.SPLIT_FILES['test']))
           for kind, stem in zip(('data', 'labels'), stems)}
  _run_tf_free(_SAVE_SPLITS + f'''
    import tensorflow_datasets as tfds
    prepare.check_reachable = lambda config, builder: None
    urls = []

    def download_and_extract(self, url_or_urls):
      urls.extend(url_or_urls.values())
      return {{key: {files!r}[key] for key in url_or_urls}}
    tfds.download.DownloadManager.download_and_extract = download_and_extract
    save_splits({str(out)!r}, ['train', 'test'], data_dir={str(tmp_path / 'tfds')!r})
    assert len(urls) == 4 and all(url.startswith('https://storage.googleapis.com/') for url in urls)
    ''')
  _assert_same(out, expected)


def _write_digit_pngs(folder: pathlib.Path, mnist_dir) -> None:
  from PIL import Image
  images, _ = idx.read_split(mnist_dir, 'test')
  folder.mkdir()
  for n in range(3):
    Image.fromarray(images[n]).save(folder / f'digit{n}.png')


def test_every_mode_runs_without_tf(tmp_path, mnist_dir):
  """train (1 epoch), eval, export, predict and report from the command line, offline, with
  TensorFlow unimportable from start to exit."""
  workdir = tmp_path / 'run'
  _write_digit_pngs(tmp_path / 'digits', mnist_dir)
  common = ['--config', 'configs/base.py', f'--workdir={workdir}',
            f'--config.data_dir={tmp_path / "tfds"}', f'--config.idx_dir={mnist_dir}',
            '--config.train_split=train[:1000]', '--config.eval_split=test[:500]',
            '--config.batch_size=100', '--config.num_epochs=1', '--config.progress_bar=False']
  modes = [[], ['--mode=eval'], ['--mode=export'],
           ['--mode=predict', f'--images={tmp_path}/digits/digit*.png'], ['--mode=report']]
  for mode in modes:
    argv = ['flax_mnist.main', *common, *mode]
    result = _run_tf_free(f'''
      import runpy
      sys.argv = {argv!r}
      runpy.run_module('flax_mnist.main', run_name='__main__', alter_sys=True)
      ''')
    if not mode:
      assert 'Preparing mnist from IDX files' in result.stdout
      assert 'Prepared mnist in ' in result.stdout
      assert 'Epoch 1/1 - 1000 samples - ' in result.stdout
    elif mode[0] == '--mode=predict':
      assert result.stdout.count('digit') >= 3, result.stdout
  assert len((workdir / 'eval.jsonl').read_text().splitlines()) == 1
  assert (workdir / 'keras_cnn.h5').is_file()
  assert (workdir / 'plots' / 'confusion_matrix.png').is_file()
