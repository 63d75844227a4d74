#!/usr/bin/env bash
# Several ranks on this CPU-only host, on loopback, through the real deepspeed launcher.
#
# Usage: RANKS=2 bash launch/cpu_multi_rank.sh [EXPERIMENT.yaml] [--output DIR] [--resume] [key=value ...]
#   (default experiment: ds_configs/ehsnet_synthetic.yaml, the main job)
# DS_ACCELERATOR=cpu makes DeepSpeed use its CPU accelerator (gloo); `--num_gpus N` then means N
# processes on this host. Each rank gets cores/RANKS threads (set in lrss_ds, or OMP_NUM_THREADS);
# --bind_cores_to_rank would pin them but needs numactl.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${1:-ds_configs/ehsnet_synthetic.yaml}"; [ $# -gt 0 ] && shift
export DS_ACCELERATOR=cpu
cd "$root"
exec deepspeed --num_gpus "${RANKS:-2}" --master_port "${MASTER_PORT:-29500}" \
  --module lrss_ds.train --config "$config" "$@"
