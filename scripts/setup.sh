#!/usr/bin/env bash
# Set up ptd on a fresh machine: a virtual environment with the pinned packages, and Debian's
# Fashion-MNIST package when apt-get is there. Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: ptd needs Python 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip install is a no-op (a few seconds) when the pinned versions are already there.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,tensorboard]"

FM=/usr/share/datasets/fashion-mnist
if [ ! -f "$FM/train-images-idx3-ubyte.gz" ] && [ ! -f "$FM/train-images-idx3-ubyte" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing Debian's dataset-fashion-mnist into $FM"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
      echo "setup: apt-get could not install dataset-fashion-mnist; run ptd with --set data.root=/folder/with/the/idx/files" >&2
    fi
  else
    echo "setup: Fashion-MNIST is not in $FM and apt-get is not available." >&2
    echo "       Put the four idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]," >&2
    echo "       t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in a folder and run ptd with" >&2
    echo "       --set data.root=/that/folder  (or --set data.download=true on a machine with internet)." >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, ptd; print("ptd", ptd.__version__, "torch", torch.__version__)'))"
