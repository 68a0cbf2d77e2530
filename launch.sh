#!/usr/bin/env bash
# One script to set up and run flax_mnist. See ./launch.sh --help.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'HELP'
Usage:
  ./launch.sh [ARGS...]        create .venv if needed, install, train configs/base.py
                               (offline from $IDX_DIR if set, else tfds downloads MNIST)
  ./launch.sh test             install with the test extra and run the test suite
  ./launch.sh --help           this text
Extra ARGS pass through to `python -m flax_mnist.main`, e.g.
  ./launch.sh --config.num_epochs=5 --workdir=/tmp/run
  IDX_DIR=../shared/data/mnist ./launch.sh
HELP
}

venv() {
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet -e ".[$1]"
}

case "${1:-}" in
  -h|--help) usage ;;
  test)
    venv test
    .venv/bin/python -m pytest tests ;;
  *)
    venv test
    idx=()
    if [[ -n "${IDX_DIR:-}" ]]; then idx=("--config.idx_dir=${IDX_DIR}"); fi
    .venv/bin/python -m flax_mnist.main --config configs/base.py "${idx[@]}" "$@" ;;
esac
