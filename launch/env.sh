#!/usr/bin/env bash
# Create (once) and reuse the project's virtual environment, then run a command inside it.
#
# Usage: bash launch/env.sh COMMAND [ARGS...]
#   bash launch/env.sh lrss-ds demo        # the main job on synthetic data
#   bash launch/env.sh pytest -q           # the test suite
#
# Why a script: torch must come from the pinned 2.13.0 release when no torch is present (on this
# project's machines that is the CPU build on local disk; a bare `torch` would pull a multi-GB
# CUDA build), and a second run must start in seconds, so pip runs only when setup.cfg changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LRSS_DS_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.lrss_ds-installed"
# The editable install points at one checkout: a venv shared by two checkouts must follow the
# one that runs now, so the checkout's path is part of the stamp.
want="$( (echo "$root"; cat "$root/setup.cfg" "$root/pyproject.toml" "$root/launch/env.sh") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[env] installing lrss_ds and its dependencies into $venv" >&2
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "$venv/bin/pip" install -q 'torch==2.13.0'
  fi
  # generic: smp, timm and torchvision for the papers' generic networks (setup.cfg)
  "$venv/bin/pip" install -q -e "$root[test,generic]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# DeepSpeed JIT-builds its CPU ops into torch's extension cache. Two environments sharing the
# default ~/.cache/torch_extensions rebuild each other's ops on every start (seen here: a clone's
# test run and benchmark probes of the main checkout took turns compiling cpu_adam, and the
# compiler's memory landed in the probes' peaks), and a build killed mid-way leaves a lock that
# blocks the next one. One cache per environment; a value set by the caller wins.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
# DeepSpeed picks the CPU accelerator by itself when no GPU is visible; saying so avoids a
# probe warning on every start. The value is marked as env.sh's own (LRSS_DS_AUTO_ACCELERATOR),
# so that slurm.sbatch and multi_node.sh decide again on the nodes that run the ranks instead of
# carrying this machine's answer to GPU nodes (launch/accelerator.sh). A value set by the
# caller is kept as it is.
. "$root/launch/accelerator.sh"
lrss_ds_decide_accelerator
cd "$root"
exec "$@"
