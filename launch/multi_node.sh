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
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  --module lrss_ds.train --config "$config" "$@"
