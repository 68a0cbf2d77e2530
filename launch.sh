#!/usr/bin/env bash
# One script to set up and run flax_mnist, here or on a Cloud TPU VM. See ./launch.sh --help.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'HELP'
Usage:
  ./launch.sh [--idx_dir DIR] [ARGS...]
      Create .venv if needed (Python >= 3.11), install the package, train configs/base.py.
      Offline from the four MNIST IDX files in DIR (or $IDX_DIR) if given, else tfds
      downloads MNIST. Run it again to resume from the newest checkpoint.
  ./launch.sh test [PYTEST_ARGS...]
      Install with the test extra and run the test suite (python -m pytest tests).
  ./launch.sh tpu-vm NAME ZONE [TYPE] [--idx_dir DIR] [ARGS...]
      Train on a Cloud TPU VM with gcloud (installed and logged in, project set):
        1. reuse TPU VM NAME in ZONE if it exists (start it if stopped), else create it:
           TYPE (default v4-8) with the runtime for its generation: v6e -> v2-alpha-tpuv6e,
           v5p -> v2-alpha-tpuv5, v5litepod (v5e) -> v2-alpha-tpuv5-lite,
           v4/v3/v2 -> tpu-ubuntu2204-base;
        2. copy this checkout (tracked and untracked, not ignored, files) to every worker;
        3. on every worker: a Python 3.12 venv (made with uv) in ~/flax_mnist/venv, then
           pip install jax[tpu] and the package;
        4. run `python -m flax_mnist.main --config configs/base.py ARGS` on every worker
           (--worker=all, with --config.distributed=on so the workers form one JAX job) in
           ~/flax_mnist; the workdir there is ~/flax_mnist/workdir/<config> unless ARGS has
           --workdir (a relative one is under ~/flax_mnist). A slice with several workers
           needs a --workdir that all of them share (e.g. a gcsfuse mount) for checkpoints;
        5. copy that workdir back from worker 0 into workdir/tpu-NAME/ here.
      Run it again to resume on the same VM. The VM keeps running (and billing) afterwards:
        gcloud compute tpus tpu-vm delete NAME --zone=ZONE
      Batch 500 runs on any type: where the device count does not divide it (8-device
      types such as v2-8), each batch is padded with masked rows that change nothing.
      Multi-host slices (e.g. v4-16) run one process per worker; only worker 0's workdir
      comes back.
  ./launch.sh --help
      This text.

ARGS pass through to `python -m flax_mnist.main`, which gets --config configs/base.py
unless ARGS name another config, e.g.
  ./launch.sh --config.num_epochs=5 --workdir=/tmp/run
  ./launch.sh --idx_dir ../shared/data/mnist
  ./launch.sh --config configs/k5_nodropout.py --mode=export
  ./launch.sh tpu-vm my-tpu us-central2-b v4-8 --config.num_epochs=5

Environment:
  IDX_DIR            same as --idx_dir
  FLAX_MNIST_PYTHON  use this Python as-is: no venv is created and nothing is installed
  PYTHON             the Python that creates .venv (default python3)
  TPU_RUNTIME        tpu-vm: runtime version to create the VM with (default: by TYPE)
  TPU_CREATE_FLAGS   tpu-vm: extra flags for `gcloud ... create`, e.g. "--spot"
  TPU_LOCAL_WORKDIR  tpu-vm: where the workdir comes back to (default workdir/tpu-NAME)
  CLOUDSDK_CORE_PROJECT  tpu-vm: the Google Cloud project (gcloud's own variable)
HELP
}

die() {
  echo "launch.sh: error: $*" >&2
  exit "${EXIT_CODE:-1}"
}

# Sets PY to the Python to run with, creating .venv and installing ".[extra]" if needed.
setup_python() {
  local extra="$1"
  if [[ -n "${FLAX_MNIST_PYTHON:-}" ]]; then
    PY="$FLAX_MNIST_PYTHON"
    return
  fi
  if [[ ! -x .venv/bin/python ]]; then
    local base="${PYTHON:-python3}"
    command -v "$base" >/dev/null || die "no $base on PATH; install Python >= 3.11 or set PYTHON."
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
      die "$base is Python $("$base" -c 'import platform; print(platform.python_version())'); flax_mnist needs >= 3.11: set PYTHON=python3.12 (or similar)."
    "$base" -m venv .venv
  fi
  PY=.venv/bin/python
  # Reinstall only when pyproject.toml changed since the last install of this extra.
  local stamp=".venv/.flax_mnist-installed${extra:+-$extra}"
  if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e ".${extra:+[$extra]}"
    touch "$stamp"
  fi
}

# Splits "$@" into IDX (from --idx_dir or $IDX_DIR) and PASS (everything else, for main), and
# reads from PASS: CONFIG (the config file, configs/base.py unless PASS names one) and
# WORKDIR (empty unless PASS has --workdir). DEFAULT_CONFIG is (--config configs/base.py)
# when PASS names no config: ml_collections rejects a second --config.
parse_passthrough() {
  IDX="${IDX_DIR:-}"
  PASS=()
  CONFIG=configs/base.py
  DEFAULT_CONFIG=(--config "$CONFIG")
  WORKDIR=""
  while (($#)); do
    case "$1" in
      --idx_dir=*) IDX="${1#--idx_dir=}" ;;
      --idx_dir)
        (($# >= 2)) || EXIT_CODE=2 die "--idx_dir needs a folder."
        IDX="$2"
        shift ;;
      *)
        case "$1" in
          --config=*) CONFIG="${1#--config=}" DEFAULT_CONFIG=() ;;
          --config) CONFIG="${2:-}" DEFAULT_CONFIG=() ;;
          --workdir=*) WORKDIR="${1#--workdir=}" ;;
          --workdir) WORKDIR="${2:-}" ;;
        esac
        PASS+=("$1") ;;
    esac
    shift
  done
  if [[ -n "$IDX" && ! -d "$IDX" ]]; then
    EXIT_CODE=2 die "IDX folder '$IDX' does not exist."
  fi
}

train_here() {
  parse_passthrough "$@"
  setup_python ""
  local idx=()
  if [[ -n "$IDX" ]]; then idx=("--config.idx_dir=$IDX"); fi
  exec "$PY" -m flax_mnist.main "${DEFAULT_CONFIG[@]}" "${PASS[@]}" "${idx[@]}"
}

run_tests() {
  setup_python test
  exec "$PY" -m pytest tests "$@"
}

runtime_for() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    v2*|v3*|v4*) echo tpu-ubuntu2204-base ;;
    *) EXIT_CODE=2 die "unknown TPU type '$1'; set TPU_RUNTIME to its runtime version." ;;
  esac
}

tpu_vm() {
  command -v gcloud >/dev/null ||
    die "tpu-vm needs the gcloud CLI, which is not on PATH (https://cloud.google.com/sdk/docs/install)."
  (($# >= 2)) && [[ "$1" != -* && "$2" != -* ]] ||
    EXIT_CODE=2 die "usage: ./launch.sh tpu-vm NAME ZONE [TYPE] [ARGS...] (see --help)."
  local name="$1" zone="$2" type=v4-8
  shift 2
  if (($#)) && [[ "$1" != -* ]]; then
    type="$1"
    shift
  fi
  parse_passthrough "$@"
  local runtime="${TPU_RUNTIME:-}"
  if [[ -z "$runtime" ]]; then runtime="$(runtime_for "$type")"; fi
  local tpu=(gcloud compute tpus tpu-vm)
  local at=("--zone=$zone")

  # Where the run writes on the VM (relative paths are under ~/flax_mnist, where it runs).
  # Every worker joins one JAX job (a pod slice has several; on one host it is a no-op).
  local workdir="$WORKDIR" extra=()
  if [[ " ${PASS[*]} " != *" --config.distributed="* ]]; then
    extra+=("--config.distributed=on")
  fi
  if [[ -z "$workdir" ]]; then
    local stem="${CONFIG##*/}"
    workdir="workdir/${stem%.py}"
    extra+=("--workdir=$workdir")
  fi
  local remote_workdir="$workdir"
  if [[ "$workdir" != /* ]]; then remote_workdir="flax_mnist/$workdir"; fi
  local local_workdir="${TPU_LOCAL_WORKDIR:-workdir/tpu-$name}"

  # 1. Reuse or create the VM.
  local state
  if state="$("${tpu[@]}" describe "$name" "${at[@]}" --format='value(state)' 2>/dev/null)"; then
    echo "launch.sh: reusing TPU VM $name in $zone (state ${state:-unknown})."
    case "$state" in
      READY|"") ;;
      STOPPED) "${tpu[@]}" start "$name" "${at[@]}" ;;
      *) die "TPU VM $name is $state; wait until it is READY, or delete it." ;;
    esac
  else
    echo "launch.sh: creating TPU VM $name ($type, runtime $runtime) in $zone."
    local create_flags=()
    read -r -a create_flags <<<"${TPU_CREATE_FLAGS:-}"
    "${tpu[@]}" create "$name" "${at[@]}" "--accelerator-type=$type" "--version=$runtime" \
      "${create_flags[@]}"
  fi

  # 2. Copy the checkout to every worker.
  TMP_DIR="$(mktemp -d)"
  trap 'rm -rf "$TMP_DIR"' EXIT
  local tmp="$TMP_DIR"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
      tar -czf "$tmp/flax_mnist_src.tar.gz" --null --ignore-failed-read -T -
  else
    tar -czf "$tmp/flax_mnist_src.tar.gz" --exclude=./.venv --exclude=./workdir \
      --exclude=./.git --exclude='*.egg-info' .
  fi
  "${tpu[@]}" scp "$tmp/flax_mnist_src.tar.gz" "$name:flax_mnist_src.tar.gz" "${at[@]}" \
    --worker=all
  # 3. Install on every worker (and copy the IDX files): Ubuntu 22.04's Python is 3.10,
  # so uv brings a 3.12. Single quotes: this runs, and expands, on the workers.
  # shellcheck disable=SC2016
  local setup='set -e
mkdir -p ~/flax_mnist && cd ~/flax_mnist
rm -rf src idx && mkdir src && tar -xzf ~/flax_mnist_src.tar.gz -C src && ln -sfn src/configs configs
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --user --quiet uv ||
  python3 -m pip install --user --quiet --break-system-packages uv
[ -x venv/bin/python ] || uv venv --quiet --python 3.12 venv
uv pip install --quiet --python venv/bin/python "jax[tpu]" ./src'
  "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all --command="$setup"
  local idx=()
  if [[ -n "$IDX" ]]; then
    "${tpu[@]}" scp --recurse "$IDX" "$name:flax_mnist/idx" "${at[@]}" --worker=all
    idx=(--config.idx_dir=idx)
  fi

  # 4. Train on all workers.
  local args=("${DEFAULT_CONFIG[@]}" "${PASS[@]}" "${idx[@]}" "${extra[@]}")
  local run
  run="cd ~/flax_mnist && venv/bin/python -m flax_mnist.main$(printf ' %q' "${args[@]}")"
  echo "launch.sh: on all workers: $run"
  "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all --command="$run"

  # 5. Bring the workdir back from worker 0.
  mkdir -p "$local_workdir"
  "${tpu[@]}" scp --recurse "$name:$remote_workdir" "$local_workdir/" "${at[@]}" --worker=0
  echo "launch.sh: workdir copied to $local_workdir/${workdir##*/}"
}

case "${1:-}" in
  -h|--help|help) usage ;;
  test) shift; run_tests "$@" ;;
  tpu-vm) shift; tpu_vm "$@" ;;
  *) train_here "$@" ;;
esac
