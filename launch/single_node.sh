#!/usr/bin/env bash
# Train on every GPU of this node through the deepspeed launcher.
#
# Usage: bash launch/single_node.sh EXPERIMENT.yaml [--output DIR] [--resume] [key=value ...]
#   NUM_GPUS=4 bash launch/single_node.sh ds_configs/ehsnet_fbp.yaml --output runs/fbp
# NUM_GPUS defaults to all visible GPUs; MASTER_PORT to 29500.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${1:?usage: $0 EXPERIMENT.yaml [--output DIR] [--resume] [key=value ...]}"; shift
# The accelerator is this node's (launch/accelerator.sh), not one chosen where env.sh ran.
. "$root/launch/accelerator.sh"
lrss_ds_decide_accelerator
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
cd "$root"
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module lrss_ds.train --config "$config" "$@"
