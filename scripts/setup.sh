#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Fashion-MNIST files (Debian) and the package with its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# The pinned build first: pip takes it from this machine's disk (a looser request can pull GBs of CUDA wheels),
# and the package's range (torch>=2.14,<3) is then already satisfied.
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e '.[test,slurm,docs]'
# RobustBench's own loader, for the tests' round trip of an exported model (tests/ml/test_checkpoints.py);
# without its dependencies, which pull a second AutoAttack from git and are not needed to load a model.
python3 -m pip install -q --no-deps robustbench==1.1.1
