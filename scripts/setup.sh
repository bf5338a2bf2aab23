#!/usr/bin/env bash
# Create .venv at the project root and install pinned requirements into it.
# Usage: scripts/setup.sh [requirements.txt|requirements-dev.txt]. Re-running is a no-op
# unless a requirements file changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
req=${1:-requirements.txt}
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(basename "$req" .txt)"
digest=$(cat "$root/requirements.txt" "$root/$req" | sha256sum | cut -d' ' -f1)
# requirements-dev.txt includes requirements.txt: a current dev install satisfies both.
dev_digest=$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.installed-requirements-dev" 2>/dev/null || true)" != "$dev_digest" ] \
    && [ "$(cat "$stamp" 2>/dev/null || true)" != "$digest" ]; then
  echo "setup: installing $req into .venv (one to two minutes on a fresh machine)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$root/$req"
  # torchvision's compiled ops must match torch's build; fail here rather than mid-run.
  "$venv/bin/python" -c "import torch, torchvision.ops"
  echo "$digest" > "$stamp"
fi
# The fused CPU batch-norm kernels, compiled for this machine now rather than at the first training step. A stamp
# (the sources' digest and the library built from them) skips even starting Python once they are built: it imports
# torch, seconds at every scripts/demo.sh run. Without a C compiler training falls back to ATen's layers, so a
# failure is not fatal.
kernels=$(cat "$root"/image_classification/models/csrc/* | sha256sum | cut -d' ' -f1)
{ read -r built library < "$venv/.fused-built"; } 2>/dev/null || true
if [ "${built:-}" != "$kernels" ] || [ ! -f "${library:-}" ]; then
  library=$(cd "$root" && "$venv/bin/python" -c "from image_classification.models import fused
print(fused.library_path() if fused.available() else '')") || true
  if [ -n "$library" ]; then
    echo "$kernels $library" > "$venv/.fused-built"
  fi
fi
