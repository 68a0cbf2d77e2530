#!/usr/bin/env bash
# A plain `pip install .` brings no TensorFlow, stays within 1.2 GB, and trains (offline, from
# the IDX files), evaluates, exports and predicts there: the run path needs no TensorFlow.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CI_LITE_VENV:-$repo/.ci-venv-lite}"
idx="${IDX_DIR:-$repo/../shared/data/mnist}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "$repo"
if "$py" -m pip list 2>/dev/null | grep -iE '^tensorflow(-cpu)? '; then
  echo "error: a plain install brought TensorFlow" >&2
  exit 1
fi
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
size=$(du -sm "$site" | cut -f1)
echo "no TensorFlow; site-packages: ${size} MB"
[ "$size" -le 1229 ] || { echo "error: site-packages is ${size} MB, over 1.2 GB" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # The installed package, not the checkout's.
run() {
  "$py" -m flax_mnist.main --config "$repo/configs/base.py" --config.idx_dir="$idx" \
    --config.data_dir="$work/tfds" --workdir="$work/w" --config.train_split='train[:1000]' \
    --config.eval_split='test[:500]' --config.batch_size=100 --config.num_epochs=1 \
    --config.progress_bar=False "$@"
}
run | tail -n 3
run --mode=eval
run --mode=export --output="$work/model.keras"
"$py" -c "
import gzip, numpy as np
from PIL import Image
raw = gzip.open('$idx/t10k-images-idx3-ubyte.gz').read()
Image.fromarray(np.frombuffer(raw, np.uint8, 784, 16).reshape(28, 28)).save('digit.png')"
run --mode=predict --images="$work/digit.png"
"$py" -c "import importlib.util as u; assert u.find_spec('tensorflow') is None"
echo "no-TensorFlow install: train, eval, export, predict passed"
