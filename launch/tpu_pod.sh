#!/usr/bin/env bash
# Train / evaluate deeplab_jax on a Cloud TPU VM pod slice (multi-host): every host runs the same
# `python -m deeplab_jax.main`, one process per host; `jax.distributed.initialize()` (called by
# main.py) finds the pod by itself, so no coordinator flags are needed.
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=deeplab-v4-32 ACCELERATOR_TYPE=v4-32
#   export WORKDIR=gs://my-bucket/deeplab/voc_xception      # shared by all hosts: must be gs://
#   export DATA_DIR=gs://my-bucket/tensorflow_datasets      # TFDS data_dir, prepared beforehand
#   export REPO_URL=https://github.com/ORG/deeplab_jax.git  # unset: ship this checkout's HEAD
#   launch/tpu_pod.sh all --config=configs/voc_xception.py --config.init_from=gs://.../pretrained
#
# Steps (first argument; `all` = create + setup + train):
#   create   create the TPU VM slice unless it exists (SPOT=1 for a spot slice)
#   setup    on all workers: Python 3.11 venv, the repository (clone/pull REPO_URL@REF, or this
#            checkout's HEAD copied over), `pip install -e . jax[tpu]`
#   prepare  build the embedded deeplab_shapes dataset into DATA_DIR (once, from worker 0)
#   train    python -m deeplab_jax.main --mode=train_and_eval --workdir=$WORKDIR ... on all workers
#   eval     python -m deeplab_jax.main --mode=eval ... on all workers
#   ssh      run the remaining arguments as a shell command on all workers
#            (e.g. `launch/tpu_pod.sh ssh 'pgrep -af deeplab_jax'`)
#   delete   delete the slice
# Arguments after the step go to deeplab_jax.main (train/eval). Rerunning `train` resumes from the
# latest checkpoint in WORKDIR. Logs: ~/deeplab_<mode>.log on every worker, also streamed here.
# VOC / Cityscapes / ADE20K must be built into DATA_DIR first (see deeplab_jax.datasets.*); a
# multi-process job never builds a dataset itself.
set -euo pipefail

STEP="${1:-all}"
shift || true

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
TPU_NAME="${TPU_NAME:?set TPU_NAME, e.g. deeplab-v4-32}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
# TPU software version: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
# v2-alpha-tpuv6e (v6e).
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/shapes.py}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
REPO_URL="${REPO_URL:-}"
REF="${REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-deeplab_jax}"  # Relative to each worker's home directory.
VENV="${VENV:-deeplab_venv}"
SPOT="${SPOT:-0}"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --project "$PROJECT")

on_all_workers() {  # on_all_workers COMMAND: run a shell command on every host of the slice.
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"
}

quote_args() {  # The arguments, shell-quoted for the remote command line.
  local out=() a
  for a in "$@"; do out+=("$(printf '%q' "$a")"); done
  echo "${out[*]:-}"
}

create() {
  if "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" >/dev/null 2>&1; then
    echo "TPU $TPU_NAME exists; reusing it."
    return
  fi
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local get_code
  if [[ -n "$REPO_URL" ]]; then
    get_code="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $REF && \
git -C $REMOTE_DIR checkout -q FETCH_HEAD; else git clone -q $REPO_URL $REMOTE_DIR && \
git -C $REMOTE_DIR checkout -q $REF; fi"
  else  # Ship this checkout's committed HEAD to every worker.
    local root archive
    root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
    archive="$(mktemp -d)/deeplab_jax.tar.gz"
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    "${GCLOUD[@]}" scp "$archive" "$TPU_NAME":deeplab_jax.tar.gz "${WHERE[@]}" --worker=all
    rm -rf "$(dirname "$archive")"
    get_code="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && \
tar -xzf deeplab_jax.tar.gz -C $REMOTE_DIR"
  fi
  on_all_workers "set -e
    command -v python3.11 >/dev/null || { sudo apt-get update -qq && \
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv git; }
    $get_code
    [ -x $VENV/bin/python ] || python3.11 -m venv $VENV
    $VENV/bin/pip install -q -U pip
    $VENV/bin/pip install -q -e $REMOTE_DIR 'jax[tpu]>=0.10.2,<0.11'
    $VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \
jax.device_count())'"
}

prepare() {
  [[ -n "$DATA_DIR" ]] || { echo "set DATA_DIR (gs://...)" >&2; exit 2; }
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command "cd $REMOTE_DIR && \
    ~/$VENV/bin/python -c 'from deeplab_jax.datasets import shapes; \
shapes.ensure_prepared(\"$DATA_DIR\")'"
}

run_main() {  # run_main MODE ARGS...: deeplab_jax.main on every host, same command line.
  local mode="$1"
  shift
  [[ "$WORKDIR" == gs://* ]] || {
    echo "WORKDIR must be a gs:// path that every host shares (got '$WORKDIR')." >&2; exit 2; }
  local args=(--config="$CONFIG" --workdir="$WORKDIR" --mode="$mode")
  [[ -n "$DATA_DIR" ]] && args+=(--config.data.data_dir="$DATA_DIR")
  args+=("$@")
  on_all_workers "cd $REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=2 ~/$VENV/bin/python -m deeplab_jax.main \
$(quote_args "${args[@]}") 2>&1 | tee ~/deeplab_$mode.log; exit \${PIPESTATUS[0]}"
}

case "$STEP" in
  create) create ;;
  setup) setup ;;
  prepare) prepare ;;
  train) run_main train_and_eval "$@" ;;
  eval) run_main eval "$@" ;;
  ssh) on_all_workers "$*" ;;
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
  all) create; setup; run_main train_and_eval "$@" ;;
  *) echo "unknown step '$STEP' (create|setup|prepare|train|eval|ssh|delete|all)" >&2; exit 2 ;;
esac
