#!/usr/bin/env bash
# Train across nodes listed in a hostfile (passwordless ssh from this node to all of them, the
# same checkout path and environment everywhere; pdsh by default, see `deepspeed --launcher`).
#
# Usage: HOSTFILE=launch/hostfile bash launch/multi_node.sh EXPERIMENT.yaml [--output DIR] [--resume] [key=value ...]
# MASTER_ADDR defaults to the first host of the hostfile, MASTER_PORT to 29500.
# The output directory must be on a filesystem every node sees (checkpoints are written by all ranks).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${1:?usage: $0 EXPERIMENT.yaml [--output DIR] [--resume] [key=value ...]}"; shift
hostfile="${HOSTFILE:-$root/launch/hostfile}"
[ -f "$hostfile" ] || { echo "no hostfile at $hostfile (copy launch/hostfile.example)" >&2; exit 2; }
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
cd "$root"
# The accelerator is decided per node (launch/accelerator.sh): DeepSpeed's runner passes the
# remote ranks only the variables it exports, so a value env.sh chose here stays here and each
# node probes its own; a value the user set is forwarded to every node.
. "$root/launch/accelerator.sh"
lrss_ds_decide_accelerator
# The runner exports NCCL_* itself only when this node's accelerator is CUDA; a GPU-less head
# node launching GPU workers would drop them. They go through DeepSpeed's environment file
# (DS_ENV_FILE), after the lines of the user's own .deepspeed_env, which that file replaces.
env_file="$(mktemp "${TMPDIR:-/tmp}/lrss_ds_deepspeed_env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
for own in "$HOME/${DS_ENV_FILE:-.deepspeed_env}" "$root/${DS_ENV_FILE:-.deepspeed_env}"; do
  if [ -f "$own" ]; then grep -v '^[[:space:]]*$' "$own" >> "$env_file" || true; fi
done
for name in $(compgen -e); do
  case "$name" in NCCL_*) printf '%s=%s\n' "$name" "${!name}" >> "$env_file" ;; esac
done
if [ -n "${DS_ACCELERATOR:-}" ] && [ -z "${LRSS_DS_AUTO_ACCELERATOR:-}" ]; then
  echo "DS_ACCELERATOR=$DS_ACCELERATOR" >> "$env_file"
fi
# Not exec: the file must outlive the launcher's start and be removed after it.
DS_ENV_FILE="$env_file" deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  --module lrss_ds.train --config "$config" "$@"
