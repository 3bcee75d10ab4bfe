#!/usr/bin/env bash
# Installs what building and running lavit needs, only where missing:
#   - libtorch 2.11.0 from the PyPI `torch==2.11.0` wheel, into the project-local .venv
#     (.cargo/config.toml points LIBTORCH and the rpath at .venv/lib/python3.11/site-packages;
#     nothing at run time needs Python). With Python 3.11 this is a real venv; with another
#     Python the cp311 wheel is unpacked into the same folder with `pip --target`.
#   - with --data: the real images the demo and tests train on (Debian packages).
#   - with --test-tools: what the client-side checks of scripts/test.sh drive the server with:
#     the official `openai` client and selenium (PyPI, pinned) in the venv, and Debian's
#     `chromium` + `chromium-driver` (a real headless browser; nothing downloads a browser).
# Reaches only the package registries (PyPI, Debian). Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
SITE=.venv/lib/python3.11/site-packages
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

apt_install() {
  echo "setup: installing $* (Debian)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if [ ! -f "$SITE/torch/lib/libtorch.so" ]; then
  echo "setup: installing libtorch (PyPI torch==$TORCH_VERSION) into .venv (once, ~4 GB)" >&2
  # The wheels (about 3 GB) and what they unpack to (about 4 GB) are on disk together for a
  # moment; pip's cache would keep a third copy, so it is off (--no-cache-dir).
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "setup: warning: $((free_kb / 1024)) MiB free in $(pwd); libtorch needs about 8 GiB while it installs and the build about 10 GiB more" >&2
  fi
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    if command -v python3.11 >/dev/null; then PY=python3.11
    elif command -v python3 >/dev/null; then PY=python3
    else apt_install python3 python3-pip python3-venv; PY=python3
    fi
  fi
  if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    # A venv (also usable for the development references in scripts/dev/).
    if ! "$PY" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3.11-venv
      "$PY" -m venv .venv
    fi
    .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION"
  else
    # Another Python: fetch the cp311 wheels for this platform and unpack them where the
    # build looks. libtorch itself does not depend on the Python version.
    "$PY" -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    mkdir -p "$SITE"
    "$PY" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
      --target "$SITE" --python-version 3.11 --only-binary=:all: "torch==$TORCH_VERSION"
  fi
  [ -f "$SITE/torch/lib/libtorch.so" ] || { echo "setup: libtorch.so missing after install" >&2; exit 1; }
fi

DATA=0; TEST_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --data) DATA=1 ;;
    --test-tools) TEST_TOOLS=1 ;;
    *) echo "setup: unknown option $arg (--data, --test-tools)" >&2; exit 2 ;;
  esac
done

if [ "$DATA" = 1 ]; then
  need=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
  [ -d /usr/share/tuxpaint/stamps ] || need+=(tuxpaint-stamps-default)
  if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
  fi
fi

# Gloo's headers (lavit-runtime's c10d shim compiles against libtorch's
# ProcessGroupGloo.hpp, which includes them; the wheel ships gloo's code inside
# libtorch_cpu.so but not its headers). Debian's libgloo-dev is unpacked, not installed,
# into .gloo/ (gitignored); runtime/build.rs looks there. Headers only: nothing of
# Debian's gloo is linked (see docs/scaling.md, "Gloo's headers").
if [ ! -f .gloo/usr/include/gloo/rendezvous/store.h ] && [ ! -f /usr/include/gloo/rendezvous/store.h ]; then
  echo "setup: unpacking gloo headers (Debian libgloo-dev) into .gloo/" >&2
  tmp=$(mktemp -d)
  ( cd "$tmp" && apt-get download libgloo-dev >/dev/null 2>&1 ) \
    || { $SUDO apt-get update -qq && ( cd "$tmp" && apt-get download libgloo-dev >/dev/null ); }
  rm -rf .gloo && mkdir -p .gloo
  dpkg -x "$tmp"/libgloo-dev_*.deb .gloo
  rm -rf "$tmp"
  [ -f .gloo/usr/include/gloo/rendezvous/store.h ] || { echo "setup: gloo headers missing after unpacking libgloo-dev" >&2; exit 1; }
fi

if [ "$TEST_TOOLS" = 1 ]; then
  OPENAI_VERSION=3.57.0
  SELENIUM_VERSION=4.51.0
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
  fi
  # The Python of the checks: the project venv, or (when libtorch was unpacked for another
  # Python) a small venv of its own under .venv/tools.
  PY=.venv/bin/python
  if [ ! -x "$PY" ]; then
    PY=.venv/tools/bin/python
    if [ ! -x "$PY" ]; then
      python3 -m venv .venv/tools 2>/dev/null || { apt_install python3-venv; python3 -m venv .venv/tools; }
    fi
  fi
  if ! "$PY" - "$OPENAI_VERSION" "$SELENIUM_VERSION" <<'PYEOF' 2>/dev/null
import sys, importlib.metadata as m
sys.exit(not (m.version("openai") == sys.argv[1] and m.version("selenium") == sys.argv[2]))
PYEOF
  then
    echo "setup: installing openai==$OPENAI_VERSION selenium==$SELENIUM_VERSION into $(dirname "$(dirname "$PY")")" >&2
    "$PY" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
      "openai==$OPENAI_VERSION" "selenium==$SELENIUM_VERSION"
  fi
fi
