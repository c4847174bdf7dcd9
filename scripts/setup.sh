#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Fashion-MNIST files (Debian) and the package with its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e '.[test]'
