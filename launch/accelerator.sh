# Decide DeepSpeed's accelerator on the node that runs the ranks (sourced by the other scripts).
#
# DeepSpeed reads DS_ACCELERATOR; unset, it probes and takes CUDA where torch sees a GPU. A value
# chosen on another machine must not follow a job to this one: `sbatch` and `srun` forward the
# submitting shell's environment, so `bash launch/env.sh sbatch ...` from a GPU-less login node
# would hand DS_ACCELERATOR=cpu (and with it gloo) to every GPU rank. env.sh therefore marks the
# value it chose itself in LRSS_DS_AUTO_ACCELERATOR; here that value is dropped and the choice is
# made again for this node. A value the user set (no mark, or a different value) is kept: a GPU
# node runs on the CPU accelerator only when the user asked for it, and it says so on stderr.
#
# GPU present = `nvidia-smi -L` lists a GPU, or a /dev/nvidiaN device node exists (a job given
# only some of a node's GPUs may see /dev/nvidia2 but no /dev/nvidia0). LRSS_DS_DEV_DIR replaces
# /dev in that test (the scripts' tests point it at a folder of their own).

lrss_ds_node_has_gpu() {
  # grep reads the whole listing (not -q): under `set -o pipefail` a grep that stops at the first
  # line would make nvidia-smi die of SIGPIPE on a many-GPU node and the test answer "no GPU".
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep '^GPU ' >/dev/null; then
    return 0
  fi
  local node
  for node in "${LRSS_DS_DEV_DIR:-/dev}"/nvidia*; do
    case "${node##*/nvidia}" in
      '' | *[!0-9]*) ;;  # nvidiactl, nvidia-uvm...: the driver's own nodes, present without a GPU
      *) return 0 ;;
    esac
  done
  return 1
}

lrss_ds_decide_accelerator() {
  if [ -n "${LRSS_DS_AUTO_ACCELERATOR:-}" ] && [ "${DS_ACCELERATOR:-}" = "$LRSS_DS_AUTO_ACCELERATOR" ]; then
    unset DS_ACCELERATOR  # chosen by env.sh for the machine it ran on, not by the user
  fi
  unset LRSS_DS_AUTO_ACCELERATOR
  if lrss_ds_node_has_gpu; then
    if [ "${DS_ACCELERATOR:-}" = cpu ]; then
      echo "[launch] $(hostname): this node has GPUs, but DS_ACCELERATOR=cpu was set: training on the CPU" >&2
    fi
  elif [ -z "${DS_ACCELERATOR:-}" ]; then
    # No GPU here: say so, which spares DeepSpeed's probe warning on every rank.
    export DS_ACCELERATOR=cpu LRSS_DS_AUTO_ACCELERATOR=cpu
  fi
}
