#!/usr/bin/env bash
# Alternative launcher path: one `deepspeed` launcher per node, started by srun from slurm/common.sh when
# BEIT3_LAUNCHER=deepspeed. The launcher then starts BEIT3_GPUS_PER_NODE training processes on its node.
#
# Usage (inside a job step, one task per node): launch_deepspeed.sh MODULE ARGS...
#   reads BEIT3_HOSTFILE (written by beit3_write_hostfile: "host slots=N" per node of the allocation),
#   BEIT3_GPUS_PER_NODE, BEIT3_PYTHON, MASTER_ADDR, MASTER_PORT, SLURM_NODEID, SLURM_JOB_NUM_NODES.
# Or: launch_deepspeed.sh --hostfile PATH [SLOTS] writes the hostfile of the current allocation and exits.
set -euo pipefail

if [[ ${1:-} == --hostfile ]]; then
  # shellcheck source=slurm/common.sh
  source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
  beit3_write_hostfile "$2" "${3:-${BEIT3_GPUS_PER_NODE:-8}}"
  exit 0
fi

module=${1:?usage: launch_deepspeed.sh MODULE ARGS... (run by slurm/common.sh, see docs/slurm.md)}
shift
: "${BEIT3_HOSTFILE:?BEIT3_HOSTFILE is not set: start this through an sbatch script with BEIT3_LAUNCHER=deepspeed}"
: "${MASTER_ADDR:?MASTER_ADDR is not set}" "${MASTER_PORT:?MASTER_PORT is not set}"

# The step's USR1 reaches every process of the step. The launcher processes would die of it (the job then
# ends FAILED with 138 instead of checkpointing), so they ignore it; the training processes install their own
# handler, which replaces the inherited "ignore", checkpoint and exit 75, and the launcher passes 75 on.
trap '' USR1

# Under this launcher the ranks come from RANK / LOCAL_RANK / WORLD_SIZE set by deepspeed. The srun task
# variables describe one launcher per node, not the training ranks, so they must not be mistaken for them.
unset SLURM_PROCID SLURM_LOCALID SLURM_NTASKS SLURM_NPROCS

exec "${BEIT3_PYTHON:-python3}" -u -m deepspeed.launcher.runner --hostfile "$BEIT3_HOSTFILE" --no_ssh \
  --node_rank "${SLURM_NODEID:-0}" --num_nodes "${SLURM_JOB_NUM_NODES:-1}" \
  --num_gpus "${BEIT3_GPUS_PER_NODE:-8}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module "$module" "$@"
