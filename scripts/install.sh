#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv from requirements.lock.
# Idempotent: when .venv already matches the lock, it returns in about a second.
# Usage: scripts/install.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.10 python3.9 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then echo "install.sh: no python3 found; fedmef-tf needs Python 3.9, 3.10 or 3.11" >&2; exit 2; fi
ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$ver" in
  3.9|3.10|3.11) ;;
  *) echo "install.sh: $PY is Python $ver; fedmef-tf needs Python 3.9, 3.10 or 3.11 (TensorFlow Federated 0.87)" >&2; exit 2;;
esac
stamp=.venv/.lock-sha256
want=$( (cat requirements.lock; echo "$ver") | sha256sum | cut -d' ' -f1)
build_native() {
  # Native CPU kernels of SAP (fedmef_tf/sap/cc/sap_ops.cc); without a C++ compiler SAP uses
  # TensorFlow ops, slower, same results. Returns at once when the library is current.
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m fedmef_tf.sap.native >/dev/null \
    || echo "install.sh: native SAP kernels not built (see above); SAP falls back to TensorFlow ops" >&2
}
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  build_native
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
rm -f "$stamp"
# pip configurations that name missing local indexes print one warning per package; drop those.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock 2>&1 \
  | { grep -v "^WARNING: Location '.*' is ignored" || true; }
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install.sh: pip could not install requirements.lock" >&2; exit 1; }
# The checkout itself goes on the environment's path (like an editable install, without a build).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/fedmef_tf_checkout.pth"
.venv/bin/python -c "import tensorflow_federated, tensorflow_model_optimization" 2>/dev/null \
  || { echo "install.sh: the environment in .venv does not import TensorFlow Federated; run scripts/install.sh --force" >&2; exit 1; }
echo "$want" > "$stamp"
build_native
echo "install.sh: environment ready in .venv (Python $ver)"
