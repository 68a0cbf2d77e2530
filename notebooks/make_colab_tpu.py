"""Writes notebooks/colab_tpu.ipynb with nbformat: python notebooks/make_colab_tpu.py.

The notebook is generated so that it stays valid nbformat v4 with stable cell ids; edit the
cells here and run this file again (tests/test_notebook.py checks the two agree).
"""

import pathlib

import nbformat
from nbformat import v4

NOTEBOOK = pathlib.Path(__file__).with_name('colab_tpu.ipynb')

CELLS = [
    ('md', 'intro', '''\
# flax_mnist on a Colab TPU

Trains the classic Keras MNIST CNN with flax_mnist on the TPU of a Colab
runtime: the base config (`configs/base.py`: 3x3 convolutions, dropout, Adam, batch 500,
20 epochs), with its checkpoints on Google Drive, then exports the model as Keras'
`keras_cnn.h5` and downloads it.

**Before you start:** *Runtime > Change runtime type*, pick a **TPU** (v5e-1, v6e-1 or v2-8),
then run the cells in order.

Every step runs the package's command line, `python -m flax_mnist.main`, in its own process;
the notebook itself never imports JAX. A TPU can be opened by one process at a time, so a
notebook that had imported JAX would hold the TPU and the training process could not use it.'''),
    ('md', 'install-md', '''\
## 1. Install from the repository

Set `REPO_URL` to the git URL of the flax_mnist repository (for example your fork on GitHub).
The next cell clones it into `REPO_DIR` and installs it with `jax[tpu]`; the config files
(`configs/`) are read from that checkout.

*Or from a copy on Google Drive:* upload the repository folder to Drive, run the Drive cell
of step 3 first, and set `REPO_DIR` to the copy (e.g. `/content/drive/MyDrive/flax_mnist`);
a folder that already holds `pyproject.toml` is not cloned again.'''),
    ('code', 'settings', '''\
# The flax_mnist git repository: replace this placeholder with its real URL.
REPO_URL = 'https://github.com/YOUR_ACCOUNT/flax_mnist.git'
REPO_DIR = '/content/flax_mnist'  # The checkout (or the Drive copy) to install and run from.'''),
    ('code', 'install', '''\
import os
import subprocess

if not os.path.exists(os.path.join(REPO_DIR, 'pyproject.toml')):
  if 'YOUR_ACCOUNT' in REPO_URL:
    raise SystemExit('Set REPO_URL in the cell above to the flax_mnist repository first.')
  subprocess.run(['git', 'clone', '--depth=1', REPO_URL, REPO_DIR], check=True)
!pip install --quiet "jax[tpu]" "{REPO_DIR}"
%cd {REPO_DIR}'''),
    ('md', 'devices-md', '''\
## 2. The TPU

The devices JAX sees, in a separate process: 1 on a v5e-1 or v6e-1, 8 on a v2-8. Every TPU
type trains with the base config's batch of 500. On 8 cores each batch is padded to 504 rows,
4 of them masked, which changes nothing computed: training's `Plan:` line then ends with
`batch padded to 504 (4 masked rows)`.'''),
    ('code', 'devices', '''\
import subprocess
import sys

probe = subprocess.run(
    [sys.executable, '-c', 'import jax; print(jax.devices()); print(jax.device_count())'],
    capture_output=True, text=True)
if probe.returncode:
  raise SystemExit(probe.stderr[-2000:])
devices, count = probe.stdout.strip().splitlines()[-2:]
print(devices)
print(f'{count} devices')'''),
    ('md', 'drive-md', '''\
## 3. The workdir on Google Drive

Training writes a checkpoint after every epoch (parameters, optimizer state, step, random
key and the metrics so far) and `metrics.jsonl` into `WORKDIR`. With `WORKDIR` on Google
Drive they outlive the runtime: when Colab disconnects, or you come back later to a new
runtime, run all the cells again and training says `Resumed from epoch E, step S` and goes on
exactly where it stopped. A finished run says so and does nothing (raise `num_epochs` with
`--config.num_epochs=N` to go on).

A workdir resumes on another TPU type too (say a v2-8's on a v5e-1, or the reverse): the
checkpoints are restored into the current device layout, and the batch is 500 on every one.'''),
    ('code', 'drive', '''\
from google.colab import drive

drive.mount('/content/drive')
WORKDIR = '/content/drive/MyDrive/flax_mnist/workdir/base'
print(WORKDIR)'''),
    ('md', 'train-md', '''\
## 4. Train

tfds downloads MNIST on first use. One line per epoch, with loss, accuracy, val_loss and
val_accuracy; about 99.2% val_accuracy after the 20 epochs.'''),
    ('code', 'train', '''\
!python -m flax_mnist.main --config configs/base.py --workdir="{WORKDIR}"'''),
    ('md', 'eval-md', '''\
Evaluate the best checkpoint (by val_accuracy) on the 10,000 test images:'''),
    ('code', 'eval', '''\
!python -m flax_mnist.main --config configs/base.py --workdir="{WORKDIR}" --mode=eval --step=best'''),
    ('md', 'export-md', '''\
## 5. Export and download `keras_cnn.h5`

`--mode=export` writes the newest checkpoint as a Keras HDF5 file (training also leaves one in
`WORKDIR` when it finishes). Keras 3 and tf-keras 2 both load it:
`keras.models.load_model('keras_cnn.h5')`.'''),
    ('code', 'export', '''\
!python -m flax_mnist.main --config configs/base.py --workdir="{WORKDIR}" --mode=export --output=/content/keras_cnn.h5'''),
    ('code', 'download', '''\
from google.colab import files

files.download('/content/keras_cnn.h5')'''),
]


def build() -> nbformat.NotebookNode:
  cells = []
  for kind, cell_id, source in CELLS:
    make = v4.new_markdown_cell if kind == 'md' else v4.new_code_cell
    cells.append(make(source, id=cell_id))
  return v4.new_notebook(cells=cells, metadata={
      'accelerator': 'TPU',
      'colab': {'name': 'colab_tpu.ipynb', 'provenance': []},
      'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
      'language_info': {'name': 'python'},
  })


def main() -> None:
  notebook = build()
  nbformat.validate(notebook)
  nbformat.write(notebook, str(NOTEBOOK))
  print(f'wrote {NOTEBOOK}')


if __name__ == '__main__':
  main()
