# shellcheck shell=bash
# The one library of shell functions behind every sbatch script in slurm/ (sourced, never run).
#
# It owns what all jobs share: defaults read from BEIT3_* environment variables, the run directory layout,
# the rendezvous variables, launching the training step, forwarding the batch-shell signal to it, and the
# requeue decision. The sbatch files only set their #SBATCH lines and recipe defaults, then call beit3_main.
# Behaviour and every variable are documented in docs/slurm.md.

# Exit code of a training program that saved a checkpoint because it was asked to stop (contract with
# beit3-pretrain / beit3-finetune); anything else non-zero is a real error.
BEIT3_EXIT_PREEMPTED=75

beit3_log() {
  echo "[beit3-slurm $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"
}

beit3_die() {
  echo "[beit3-slurm] error: $*" >&2
  exit 2
}

# Fill every BEIT3_* setting that the caller left unset with the cluster default.
beit3_defaults() {
  : "${BEIT3_REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
  : "${BEIT3_PYTHON:=python3}"
  : "${BEIT3_LAUNCHER:=srun}"
  : "${BEIT3_GPUS_PER_NODE:=8}"
  : "${BEIT3_MAX_REQUEUES:=20}"
  : "${BEIT3_EXTRA_ARGS:=}"
  : "${BEIT3_SRUN_ARGS:=}"
  : "${BEIT3_RUN_DIR:=$BEIT3_REPO/runs/${SLURM_JOB_NAME:-beit3}}"
}

# Check the settings before any node time is spent; messages name the variable to fix.
beit3_validate() {
  [[ -n ${SLURM_JOB_ID:-} ]] || beit3_die "not inside a Slurm job: submit with sbatch (see docs/slurm.md)"
  [[ -d $BEIT3_REPO/slurm ]] || beit3_die "BEIT3_REPO=$BEIT3_REPO is not the repository root: submit from \
the repository root or export BEIT3_REPO"
  command -v "$BEIT3_PYTHON" >/dev/null || beit3_die "BEIT3_PYTHON=$BEIT3_PYTHON not found: activate the \
environment in BEIT3_ENV_SETUP or set BEIT3_PYTHON"
  [[ -f $BEIT3_RECIPE ]] || beit3_die "recipe BEIT3_RECIPE=$BEIT3_RECIPE does not exist"
  [[ -f $BEIT3_DS_CONFIG ]] || beit3_die "DeepSpeed config BEIT3_DS_CONFIG=$BEIT3_DS_CONFIG does not exist"
  [[ $BEIT3_MAX_REQUEUES =~ ^[0-9]+$ ]] || beit3_die "BEIT3_MAX_REQUEUES must be a number >= 0"
  [[ $BEIT3_GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || beit3_die "BEIT3_GPUS_PER_NODE must be a number >= 1"
  case $BEIT3_LAUNCHER in
    srun | deepspeed) ;;
    *) beit3_die "BEIT3_LAUNCHER=$BEIT3_LAUNCHER: use 'srun' (one task per GPU) or 'deepspeed'" ;;
  esac
}

# Paths are resolved against the repository so that a job does not depend on the directory it runs in.
beit3_abspath() {
  case $1 in
    /*) echo "$1" ;;
    *) echo "$BEIT3_REPO/$1" ;;
  esac
}

# MASTER_ADDR = first host of the allocation; MASTER_PORT from the job id (two jobs sharing a node do not
# collide) and the restart count (a requeued attempt never meets a port still held by the previous one).
beit3_rendezvous() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  [[ -n $MASTER_ADDR ]] || beit3_die "could not expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  : "${BEIT3_MASTER_PORT:=$((20000 + (SLURM_JOB_ID * 13 + ${SLURM_RESTART_COUNT:-0}) % 20000))}"
  MASTER_PORT=$BEIT3_MASTER_PORT
  export MASTER_ADDR MASTER_PORT
  # Rank variables inherited from the submitting shell (sbatch exports its environment) would override
  # SLURM_PROCID in every task: all ranks would claim rank 0. Each task's rank comes from Slurm.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
  # One OpenMP thread per CPU Slurm gave the task, unless the environment chose already.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # On NCCL, a rank that dies makes the others raise after the timeout instead of hanging forever.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# Lines "localhost slots=8", one per node of the allocation, as the deepspeed launcher reads them.
beit3_write_hostfile() {
  local path=$1 slots=$2 host
  : >"$path"
  for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    echo "$host slots=$slots" >>"$path"
  done
  [[ -s $path ]] || beit3_die "empty hostfile: SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
}

# Run directory: checkpoints/ config.json tensorboard/ (written by the program), logs/ (written here).
beit3_prepare_run_dir() {
  mkdir -p "$BEIT3_RUN_DIR/logs" || beit3_die "cannot create BEIT3_RUN_DIR=$BEIT3_RUN_DIR"
  # The console log lives where #SBATCH --output put it; a link makes it findable from the run directory.
  local out
  out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
  if [[ -n $out && -f $out && $(dirname "$out") != "$BEIT3_RUN_DIR/logs" ]]; then
    ln -sfn "$out" "$BEIT3_RUN_DIR/logs/$(basename "$out")"
  fi
}

# One line per attempt in logs/attempts.tsv: the history of a job across requeues.
beit3_record_attempt() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SLURM_JOB_ID" \
    "${SLURM_RESTART_COUNT:-0}" "$1" "$2" >>"$BEIT3_RUN_DIR/logs/attempts.tsv"
}

# The program's arguments. --resume auto is always passed: a first attempt finds no checkpoint and starts
# fresh, a requeued one continues from checkpoints/latest with the very same command.
beit3_program_args() {
  BEIT3_ARGS=(--config "$BEIT3_RECIPE" --ds-config "$BEIT3_DS_CONFIG" --output-dir "$BEIT3_RUN_DIR"
    --resume auto)
  # Finetuning recipes name their task; BEIT3_TASK_NAME overrides it (beit3-finetune --task).
  [[ -n ${BEIT3_TASK_NAME:-} ]] && BEIT3_ARGS=(--task "$BEIT3_TASK_NAME" "${BEIT3_ARGS[@]}")
  local extra
  read -r -a extra <<<"$BEIT3_EXTRA_ARGS"
  BEIT3_ARGS+=("${extra[@]}")
}

# The job step: one task per GPU under srun, or one deepspeed launcher per node (slurm/launch_deepspeed.sh).
beit3_step_command() {
  local srun_args
  read -r -a srun_args <<<"$BEIT3_SRUN_ARGS"
  if [[ $BEIT3_LAUNCHER == srun ]]; then
    # Slurm 23.11+ srun no longer inherits the job's --cpus-per-task (each task would get one CPU and its data
    # loader workers would starve under cgroups); SRUN_CPUS_PER_TASK passes it on with every version.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    BEIT3_STEP=(srun --kill-on-bad-exit=0 "${srun_args[@]}" "$BEIT3_PYTHON" -u -m "$BEIT3_MODULE"
      "${BEIT3_ARGS[@]}")
  else
    BEIT3_HOSTFILE=$BEIT3_RUN_DIR/logs/hostfile-$SLURM_JOB_ID
    beit3_write_hostfile "$BEIT3_HOSTFILE" "$BEIT3_GPUS_PER_NODE"
    export BEIT3_HOSTFILE BEIT3_GPUS_PER_NODE BEIT3_PYTHON
    # One task per node that must hold all of the node's CPUs: its launcher starts every rank of the node,
    # and with task/affinity or cgroups a task is confined to the CPUs of its own allocation.
    BEIT3_STEP=(srun --kill-on-bad-exit=0 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES"
      --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${srun_args[@]}"
      bash "$BEIT3_REPO/slurm/launch_deepspeed.sh" "$BEIT3_MODULE" "${BEIT3_ARGS[@]}")
  fi
}

# --- signals ---------------------------------------------------------------------------------------------
# Slurm sends USR1 (--signal=B:USR1@T, or scancel --batch --signal=USR1) to this shell only. It is passed to
# the step, whose programs checkpoint at the next step boundary and exit 75. TERM (time limit, scancel) is
# delivered by Slurm to every step process already; forwarding it would make srun cancel the step before
# the checkpoint is written, so it is only noted: a job that is being ended is never requeued.
BEIT3_SIGNALS=0
BEIT3_TERMINATING=0
BEIT3_STEP_PID=

beit3_on_usr1() {
  BEIT3_SIGNALS=$((BEIT3_SIGNALS + 1))
  beit3_log "USR1 received: asking the training step to checkpoint and stop"
  [[ -n $BEIT3_STEP_PID ]] && kill -USR1 "$BEIT3_STEP_PID" 2>/dev/null
}

beit3_on_term() {
  BEIT3_SIGNALS=$((BEIT3_SIGNALS + 1))
  BEIT3_TERMINATING=1
  beit3_log "TERM received: Slurm is ending the job; the step got TERM from Slurm and will checkpoint"
}

# Start the step in the background and wait for it; `wait` returns early when a trapped signal arrives, so
# wait again until the step itself has exited. Returns the step's exit code.
beit3_run_step() {
  trap beit3_on_usr1 USR1
  trap beit3_on_term TERM
  "$@" &
  BEIT3_STEP_PID=$!
  local rc again seen
  while :; do
    seen=$BEIT3_SIGNALS
    wait "$BEIT3_STEP_PID"
    rc=$?
    # A status above 128 with a signal handled meanwhile means `wait` was interrupted, not that the step
    # ended; a second wait then tells (127 = already reaped, so the first status was the real one).
    ((rc > 128 && BEIT3_SIGNALS != seen)) || break
    wait "$BEIT3_STEP_PID"
    again=$?
    ((again == 127)) && break
    rc=$again
    ((rc > 128 && BEIT3_SIGNALS != seen)) || break
  done
  BEIT3_STEP_PID=
  return "$rc"
}

# Requeue only a run that checkpointed on request (exit 75), is not being cancelled, and is under the cap.
# Prints the decision: finished | requeue | failed | cancelled | cap.
beit3_decide() {
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if ((rc == 0)); then
    echo finished
  elif ((rc != BEIT3_EXIT_PREEMPTED)); then
    echo failed
  elif ((BEIT3_TERMINATING)); then
    echo cancelled
  elif ((restarts >= BEIT3_MAX_REQUEUES)); then
    echo cap
  else
    echo requeue
  fi
}

beit3_finish() {
  local rc=$1 decision
  decision=$(beit3_decide "$rc")
  beit3_record_attempt "$rc" "$decision"
  case $decision in
    finished) beit3_log "training finished" ;;
    failed) beit3_log "training step failed with exit code $rc: not requeued (a real error; see above)" ;;
    cancelled) beit3_log "checkpoint saved while Slurm ends the job: not requeued; resubmit to continue" ;;
    cap) beit3_log "checkpoint saved, but BEIT3_MAX_REQUEUES=$BEIT3_MAX_REQUEUES requeues are used up: \
resubmit the same script to continue from the checkpoint" ;;
    requeue)
      beit3_log "checkpoint saved: requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
      if ! scontrol requeue "$SLURM_JOB_ID"; then
        beit3_log "scontrol requeue failed (was the job submitted with --requeue?): resubmit to continue"
        exit "$rc"
      fi
      exit 0
      ;;
  esac
  exit "$rc"
}

# Entry point of every sbatch script: beit3_main MODULE (e.g. beit3.pretrain.train).
beit3_main() {
  : "${BEIT3_MODULE:=$1}"
  # Site environment (module load, conda activate, NCCL variables) before anything looks for Python.
  if [[ -n ${BEIT3_ENV_SETUP:-} ]]; then
    [[ -f $BEIT3_ENV_SETUP ]] || beit3_die "BEIT3_ENV_SETUP=$BEIT3_ENV_SETUP does not exist"
    # shellcheck disable=SC1090
    source "$BEIT3_ENV_SETUP"
  fi
  beit3_defaults
  BEIT3_RECIPE=$(beit3_abspath "$BEIT3_RECIPE")
  BEIT3_DS_CONFIG=$(beit3_abspath "$BEIT3_DS_CONFIG")
  BEIT3_RUN_DIR=$(beit3_abspath "$BEIT3_RUN_DIR")
  beit3_validate
  beit3_prepare_run_dir
  beit3_rendezvous
  beit3_program_args
  beit3_step_command
  cd "$BEIT3_REPO" || beit3_die "cannot enter BEIT3_REPO=$BEIT3_REPO"
  beit3_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
    "nodes=$SLURM_JOB_NUM_NODES tasks=${SLURM_NTASKS:-?} MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  beit3_log "run dir $BEIT3_RUN_DIR"
  beit3_log "step: ${BEIT3_STEP[*]}"
  local rc=0
  beit3_run_step "${BEIT3_STEP[@]}" || rc=$?
  beit3_log "training step exited with code $rc"
  beit3_finish "$rc"
}
