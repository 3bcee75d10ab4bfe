#!/usr/bin/env bash
# Installs what building and running lavit needs, only where missing:
#   - libtorch 2.11.0 from the PyPI `torch==2.11.0` wheel, into the project-local .venv
#     (.cargo/config.toml points LIBTORCH and the rpath there; nothing at run time needs Python)
#   - with --data: the real images the demo and tests train on (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
PY=${PYTHON:-python3}
if [ ! -f .venv/lib/python3.11/site-packages/torch/lib/libtorch.so ]; then
  echo "setup: installing libtorch (PyPI torch==$TORCH_VERSION) into .venv (once, ~4.6 GB)" >&2
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup: python3.11 is required (the venv path in .cargo/config.toml names it)" >&2
    exit 1
  fi
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi

if [ "${1:-}" = "--data" ]; then
  need=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
  [ -d /usr/share/tuxpaint/stamps ] || need+=(tuxpaint-stamps-default)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]} (Debian)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
