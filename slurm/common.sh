# shellcheck shell=bash
# The one library of shell functions behind every sbatch script in slurm/ (sourced, never run).
#
# It owns what all jobs share: defaults read from BEIT3_* environment variables, the run directory layout,
# the rendezvous variables, launching the training step, forwarding the batch-shell signal to it, and the
# requeue decision. The sbatch files only set their #SBATCH lines and recipe defaults, then call beit3_main.
# Behaviour and every variable are documented in docs/slurm.md.

# Exit codes of the training programs (engine/supervise.py): 2 a configuration mistake, 3 too many
# non-finite losses (neither is ever requeued: the next attempt would fail the same way), 75 a checkpoint
# saved because the job was asked to stop (requeued within BEIT3_MAX_REQUEUES), 76 the watchdog found no step
# progress and dumped the stacks (requeued within the failure budget BEIT3_MAX_FAILURES, like a rank killed by
# a signal or lost with its node). Anything else is an unexpected error: not requeued.
BEIT3_EXIT_CONFIG=2
BEIT3_EXIT_NONFINITE=3
BEIT3_EXIT_PREEMPTED=75
BEIT3_EXIT_HUNG=76
# Reasons (attempts.tsv, column "reason") that spend the failure budget when requeued.
BEIT3_FAILURE_REASONS="hung node_fault"

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
  : "${BEIT3_MAX_FAILURES:=3}"
  : "${BEIT3_EXCLUDE_FAILED_NODES:=1}"
  : "${BEIT3_INIT_TIMEOUT_S:=600}"
  : "${BEIT3_COLLECTIVE_TIMEOUT_S:=1800}"
  : "${BEIT3_WATCHDOG_S:=}"
  : "${BEIT3_HUNG_GRACE_S:=30}"
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
  [[ $BEIT3_MAX_FAILURES =~ ^[0-9]+$ ]] || beit3_die "BEIT3_MAX_FAILURES must be a number >= 0"
  [[ $BEIT3_EXCLUDE_FAILED_NODES =~ ^[01]$ ]] || beit3_die "BEIT3_EXCLUDE_FAILED_NODES must be 0 or 1"
  local var
  for var in BEIT3_INIT_TIMEOUT_S BEIT3_COLLECTIVE_TIMEOUT_S; do
    [[ -z ${!var} || ${!var} =~ ^[1-9][0-9]*$ ]] || beit3_die "$var=${!var} must be a number of seconds >= 1 \
(or empty for the program's default)"
  done
  [[ -z $BEIT3_WATCHDOG_S || $BEIT3_WATCHDOG_S =~ ^[0-9]+$ ]] \
    || beit3_die "BEIT3_WATCHDOG_S=$BEIT3_WATCHDOG_S must be a number of seconds (0: no watchdog; empty: \
derived from the step time)"
  [[ $BEIT3_HUNG_GRACE_S =~ ^[0-9]+$ ]] || beit3_die "BEIT3_HUNG_GRACE_S must be a number of seconds >= 0"
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
}

# Timeouts and the NCCL flight recorder, exported to every task (docs/slurm.md, "Hangs and collective
# timeouts"). A value already in the environment wins. The programs read BEIT3_INIT_TIMEOUT_S (process-group
# set-up), BEIT3_COLLECTIVE_TIMEOUT_S (any collective during training) and BEIT3_WATCHDOG_S (no step
# progress: dump stacks, exit 76; empty = derived from the median step time). Keep the watchdog below the
# collective timeout, so that a hang ends in stack dumps rather than in a collective's timeout error.
beit3_fault_env() {
  local var prefix
  for var in BEIT3_INIT_TIMEOUT_S BEIT3_COLLECTIVE_TIMEOUT_S BEIT3_WATCHDOG_S; do
    if [[ -n ${!var:-} ]]; then export "${var?}"; else unset "$var"; fi
  done
  # On NCCL, a rank that dies makes the others raise after the timeout instead of hanging forever.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Flight recorder: each rank keeps its last collectives in a ring buffer and, when a collective times out,
  # writes it to <prefix><rank>. torch 2.13 reads TORCH_FR_BUFFER_SIZE / TORCH_FR_DUMP_TEMP_FILE and warns
  # about the older TORCH_NCCL_TRACE_BUFFER_SIZE / TORCH_NCCL_DEBUG_INFO_TEMP_FILE, which older releases
  # read instead: those are set too when the interpreter's torch is older than 2.13. The dump needs the
  # monitoring thread (on by default; set so that a site default cannot drop it).
  export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}}
  prefix=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$BEIT3_RUN_DIR/nccl_trace/rank_}
  export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$prefix}
  if beit3_torch_older_than 2 13; then
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-$TORCH_FR_BUFFER_SIZE}
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TORCH_FR_DUMP_TEMP_FILE}
  fi
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_ENABLE_MONITORING=${TORCH_NCCL_ENABLE_MONITORING:-1}
  mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
}

# beit3_torch_older_than MAJOR MINOR: true if BEIT3_PYTHON's torch is older (or its version unreadable).
# Reads the installed package's metadata, without importing torch.
beit3_torch_older_than() {
  local version major minor
  version=$("$BEIT3_PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) \
    || return 0
  IFS=. read -r major minor _ <<<"$version"
  [[ $major =~ ^[0-9]+$ && ${minor%%[!0-9]*} =~ ^[0-9]+$ ]] || return 0
  minor=${minor%%[!0-9]*}
  ((major < $1 || (major == $1 && minor < $2)))
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

# Run directory: checkpoints/ config.json tensorboard/ (written by the program), attempts.tsv, logs/ and
# nccl_trace/ (written here).
beit3_prepare_run_dir() {
  mkdir -p "$BEIT3_RUN_DIR/logs" || beit3_die "cannot create BEIT3_RUN_DIR=$BEIT3_RUN_DIR"
  BEIT3_TASK_DIR=$BEIT3_RUN_DIR/logs/tasks/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
  rm -rf "$BEIT3_TASK_DIR"
  mkdir -p "$BEIT3_TASK_DIR"
  export BEIT3_TASK_DIR
  # The console log lives where #SBATCH --output put it; a link makes it findable from the run directory.
  local out
  out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
  if [[ -n $out && -f $out && $(dirname "$out") != "$BEIT3_RUN_DIR/logs" ]]; then
    ln -sfn "$out" "$BEIT3_RUN_DIR/logs/$(basename "$out")"
  fi
}

beit3_now() {
  date -u +%Y-%m-%dT%H:%M:%SZ
}

# RUN_DIR/attempts.tsv: one line per attempt of every job that used the run directory, after a header.
BEIT3_ATTEMPTS_HEADER=$'job_id\trestart\tstart\tend\texit_code\treason\tdecision\tlast_step'
BEIT3_ATTEMPTS_HEADER+=$'\tnodes\tfailed_nodes'

# The step of the checkpoint that checkpoints/latest names (a tag like step00001000), or - if none.
beit3_last_step() {
  local tag digits
  tag=$(head -n1 "$BEIT3_RUN_DIR/checkpoints/latest" 2>/dev/null) || tag=
  digits=${tag##*[!0-9]}
  if [[ -n $digits ]]; then echo "$((10#$digits))"; else echo -; fi
}

# beit3_record_attempt EXIT_CODE REASON DECISION: append this attempt's line.
beit3_record_attempt() {
  local file=$BEIT3_RUN_DIR/attempts.tsv
  [[ -s $file ]] || echo "$BEIT3_ATTEMPTS_HEADER" >>"$file"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" \
    "${BEIT3_ATTEMPT_START:-$(beit3_now)}" "$(beit3_now)" "$1" "$2" "$3" "$(beit3_last_step)" \
    "${SLURM_JOB_NODELIST:--}" "${BEIT3_FAILED_NODES:--}" >>"$file"
}

# Earlier attempts of this job that spent the failure budget (attempts.tsv survives the requeue; the
# restart count alone cannot tell preemptions from failures).
beit3_failures_so_far() {
  local file=$BEIT3_RUN_DIR/attempts.tsv
  [[ -f $file ]] || {
    echo 0
    return
  }
  awk -F '\t' -v job="$SLURM_JOB_ID" -v reasons=" $BEIT3_FAILURE_REASONS " \
    '$1 == job && $7 == "requeue" && index(reasons, " " $6 " ") { n++ } END { print n + 0 }' "$file"
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
    BEIT3_STEP_TASKS=${SLURM_NTASKS:-1}
    BEIT3_STEP=(srun --kill-on-bad-exit=0 "${srun_args[@]}" bash "$BEIT3_REPO/slurm/task.sh"
      "$BEIT3_PYTHON" -u -m "$BEIT3_MODULE" "${BEIT3_ARGS[@]}")
  else
    BEIT3_HOSTFILE=$BEIT3_RUN_DIR/logs/hostfile-$SLURM_JOB_ID
    beit3_write_hostfile "$BEIT3_HOSTFILE" "$BEIT3_GPUS_PER_NODE"
    export BEIT3_HOSTFILE BEIT3_GPUS_PER_NODE BEIT3_PYTHON
    # One task per node that must hold all of the node's CPUs: its launcher starts every rank of the node,
    # and with task/affinity or cgroups a task is confined to the CPUs of its own allocation.
    BEIT3_STEP_TASKS=$SLURM_JOB_NUM_NODES
    BEIT3_STEP=(srun --kill-on-bad-exit=0 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES"
      --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${srun_args[@]}"
      bash "$BEIT3_REPO/slurm/task.sh" bash "$BEIT3_REPO/slurm/launch_deepspeed.sh" "$BEIT3_MODULE"
      "${BEIT3_ARGS[@]}")
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

# Installed when this file is sourced, not when the step starts: a USR1 that arrives during the set-up
# (environment, checks) would otherwise kill the batch shell (bash's default for USR1), and the job would
# end FAILED with no checkpoint and no requeue.
trap beit3_on_usr1 USR1
trap beit3_on_term TERM

# A rank that exited 76 (its watchdog fired) while others are still in the step: those are stuck in a
# collective or stopped (SIGSTOP, a frozen node), and srun would wait for them forever. After
# BEIT3_HUNG_GRACE_S seconds, in which the other ranks' watchdogs normally fire too, the step's remaining
# tasks get SIGKILL (a stopped process dies only of that). srun can still wait on after that: for the exit
# message of a task on a node whose slurmstepd is slow or gone, or for processes of the step that kept its
# output open. So each further grace period escalates: the step is cancelled (slurmctld ends it), then srun
# itself is killed; the batch shell then reads the task records as after any step. Runs in the background
# beside the step.
beit3_watch_for_hang() {
  local step_pid=$1 since= stage=0 step steps
  trap '' USR1
  while kill -0 "$step_pid" 2>/dev/null; do
    if [[ -z $since ]] && grep -qs $'\t'"$BEIT3_EXIT_HUNG"'$' "$BEIT3_TASK_DIR"/*; then
      since=$SECONDS
      beit3_log "a rank exited $BEIT3_EXIT_HUNG (hung): the others get ${BEIT3_HUNG_GRACE_S}s to end"
    fi
    if [[ -n $since ]] && ((SECONDS - since >= (stage + 1) * BEIT3_HUNG_GRACE_S)); then
      steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E "^$SLURM_JOB_ID\.[0-9]+$")
      case $stage in
        0)
          beit3_log "the step still runs ${BEIT3_HUNG_GRACE_S}s after a rank hung: killing its remaining tasks"
          for step in $steps; do
            scancel --signal=KILL "$step" 2>/dev/null  # it complains about tasks that are gone already
          done
          ;;
        1)
          beit3_log "srun still waits ${BEIT3_HUNG_GRACE_S}s after the kill: cancelling the step"
          for step in $steps; do
            scancel "$step" 2>/dev/null
          done
          ;;
        *)
          beit3_log "srun still runs ${BEIT3_HUNG_GRACE_S}s after the step was cancelled: killing srun"
          kill -KILL "$step_pid" 2>/dev/null
          return
          ;;
      esac
      stage=$((stage + 1))
    fi
    sleep 1
  done
}

# Start the step in the background and wait for it; `wait` returns early when a trapped signal arrives, so
# wait again until the step itself has exited. Returns the step's exit code.
beit3_run_step() {
  trap beit3_on_usr1 USR1
  trap beit3_on_term TERM
  "$@" &
  BEIT3_STEP_PID=$!
  local watcher=
  if [[ -n ${BEIT3_TASK_DIR:-} && -d $BEIT3_TASK_DIR ]]; then
    beit3_watch_for_hang "$BEIT3_STEP_PID" &
    watcher=$!
  fi
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
  if [[ -n $watcher ]]; then
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
  fi
  return "$rc"
}

# --- what happened, and what to do about it ---------------------------------------------------------------
# Each task of the step leaves "node<TAB>exit code" in $BEIT3_TASK_DIR/<task id> (slurm/task.sh). With them
# a rank killed by a signal (the kernel's OOM killer, a segfault, an NCCL abort) is told apart from the ranks
# that then failed at their next collective with exit 1, and a task that left nothing lost its node.

# Signals that Slurm or this library send on purpose (USR1: stop; TERM: end): a rank dying of one is not the
# fault of its node, so the node is not excluded.
BEIT3_REQUESTED_SIGNALS=" 10 15 "

# beit3_classify STEP_EXIT_CODE: sets BEIT3_REASON (finished, preempted, hung, node_fault, config, nonfinite,
# error) and BEIT3_FAILED_NODES (comma-separated nodes to exclude, or empty).
beit3_classify() {
  local rc=$1 f node code ntasks seen=0 killed_nodes=() healthy=0 any2=0 any3=0 any76=0 any75=0 other=0
  if [[ ${BEIT3_PREEMPTED_BEFORE_STEP:-0} == 1 ]]; then  # no task ran: no task could report
    BEIT3_REASON=preempted
    BEIT3_FAILED_NODES=
    return 0
  fi
  declare -A with_record=()
  BEIT3_FAILED_NODES=
  ntasks=${BEIT3_STEP_TASKS:-0}
  if [[ -n ${BEIT3_TASK_DIR:-} && -d $BEIT3_TASK_DIR ]]; then
    for f in "$BEIT3_TASK_DIR"/*; do
      [[ -f $f ]] || continue
      IFS=$'\t' read -r node code <"$f" || continue
      [[ $code =~ ^[0-9]+$ ]] || continue
      seen=$((seen + 1))
      with_record[$node]=1
      if ((code > 128)); then
        [[ $BEIT3_REQUESTED_SIGNALS == *" $((code - 128)) "* ]] || killed_nodes+=("$node")
        other=1
        continue
      fi
      healthy=1
      case $code in
        0) ;;
        "$BEIT3_EXIT_CONFIG") any2=1 ;;
        "$BEIT3_EXIT_NONFINITE") any3=1 ;;
        "$BEIT3_EXIT_HUNG") any76=1 ;;
        "$BEIT3_EXIT_PREEMPTED") any75=1 ;;
        *) other=1 ;;
      esac
    done
  fi
  if ((rc == 0)); then
    BEIT3_REASON=finished
    return
  fi
  if ((seen == 0)); then
    # No task records (not started through task.sh): the step's exit code alone.
    case $rc in
      "$BEIT3_EXIT_CONFIG") BEIT3_REASON=config ;;
      "$BEIT3_EXIT_NONFINITE") BEIT3_REASON=nonfinite ;;
      "$BEIT3_EXIT_PREEMPTED") BEIT3_REASON=preempted ;;
      "$BEIT3_EXIT_HUNG") BEIT3_REASON=hung ;;
      *) if ((rc > 128)); then BEIT3_REASON=node_fault; else BEIT3_REASON=error; fi ;;
    esac
    return
  fi
  # Nodes of the allocation from which no task reported: lost (or their tasks were never started).
  local lost=()
  if ((seen < ntasks)); then
    for node in $(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null); do
      [[ -n ${with_record[$node]:-} ]] || lost+=("$node")
    done
  fi
  # Blame a node only when some task elsewhere behaved: if every rank died the same way, no node is known.
  if ((${#killed_nodes[@]} || ${#lost[@]})) && ((healthy || ${#lost[@]})); then
    BEIT3_FAILED_NODES=$(printf '%s\n' "${killed_nodes[@]}" "${lost[@]}" | sed '/^$/d' | sort -u \
      | paste -sd,)
  fi
  # A configuration mistake or non-finite losses outrank everything (requeueing cannot help); a hang
  # (some rank's watchdog fired; the ranks it waited for were killed afterwards) outranks the kills.
  if ((any2)); then
    BEIT3_REASON=config
  elif ((any3)); then
    BEIT3_REASON=nonfinite
  elif ((any76)); then
    BEIT3_REASON=hung
  elif ((${#killed_nodes[@]} || ${#lost[@]} || (other && rc > 128))); then
    BEIT3_REASON=node_fault
  elif ((any75 && !other)); then
    BEIT3_REASON=preempted
  else
    BEIT3_REASON=error
  fi
}

# beit3_decide REASON: finished | requeue | failed | cancelled | cap | budget.
# Preemptions requeue while SLURM_RESTART_COUNT < BEIT3_MAX_REQUEUES (the ceiling on restarts of any kind);
# hangs and node faults also need room in the failure budget: at most BEIT3_MAX_FAILURES of them are
# requeued per job (counted in attempts.tsv). A job that Slurm is ending (TERM) is never requeued.
beit3_decide() {
  local reason=$1 restarts=${SLURM_RESTART_COUNT:-0} failures
  case $reason in
    finished) echo finished ;;
    config | nonfinite | error) echo failed ;;
    *)
      if ((BEIT3_TERMINATING)); then
        echo cancelled
      elif [[ " $BEIT3_FAILURE_REASONS " == *" $reason "* ]] \
        && failures=$(beit3_failures_so_far) && ((failures >= BEIT3_MAX_FAILURES)); then
        echo budget
      elif ((restarts >= BEIT3_MAX_REQUEUES)); then
        echo cap
      else
        echo requeue
      fi
      ;;
  esac
}

# Keep the failed nodes out of the requeued job: ExcNodeList can only change while the job is pending, and
# `scontrol requeue` ends this shell, so a detached helper waits for the job to be pending and updates it
# (Slurm holds a requeued job for a while before it may start: 2 minutes by default, ~6 s on the localhost
# cluster). A node is never excluded if the partition would be left with fewer nodes than the job needs.
# Where the helper cannot outlive the job (cgroup process tracking) the job simply requeues without it.
beit3_exclude_nodes() {
  local failed=$1 current merged available need=${SLURM_JOB_NUM_NODES:-1}
  ((BEIT3_EXCLUDE_FAILED_NODES)) || {
    beit3_log "not excluding $failed: BEIT3_EXCLUDE_FAILED_NODES=0"
    return
  }
  current=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
  [[ $current == "(null)" ]] && current=
  merged=$(
    {
      [[ -n $current ]] && scontrol show hostnames "$current"
      tr ',' '\n' <<<"$failed"
    } | sed '/^$/d' | sort -u | paste -sd,
  )
  available=$(sinfo -h -N -p "${SLURM_JOB_PARTITION:-}" -t idle,alloc,mix,comp -o %N 2>/dev/null \
    | sort -u | grep -cvxF -f <(tr ',' '\n' <<<"$merged"))
  if ((available < need)); then
    beit3_log "not excluding $failed: the partition would keep $available node(s) for a $need-node job"
    return
  fi
  beit3_log "excluding $merged from the requeued job (ExcNodeList)"
  local log=$BEIT3_RUN_DIR/logs/exclude-$SLURM_JOB_ID.log
  (
    setsid bash -c '
      for _ in $(seq 600); do
        state=$(scontrol show job -o "$1" 2>/dev/null | grep -o "JobState=[A-Z_]*")
        case $state in
          JobState=PENDING)
            scontrol update job="$1" ExcNodeList="$2" && echo "ExcNodeList=$2 set on pending job $1"
            exit ;;
          JobState=RUNNING | JobState=COMPLETED | JobState=FAILED | JobState=CANCELLED)
            [[ $3 == seen ]] && { echo "job $1 left pending before ExcNodeList=$2 could be set"; exit; } ;;
          *) set -- "$1" "$2" seen ;;
        esac
        sleep 0.2
      done' beit3-exclude "$SLURM_JOB_ID" "$merged" "" </dev/null >>"$log" 2>&1 &
  )
}

beit3_finish() {
  local rc=$1 decision restarts=${SLURM_RESTART_COUNT:-0}
  beit3_classify "$rc"
  decision=$(beit3_decide "$BEIT3_REASON")
  beit3_record_attempt "$rc" "$BEIT3_REASON" "$decision"
  case $decision in
    finished) beit3_log "training finished" ;;
    failed) beit3_log "training step failed with exit code $rc ($BEIT3_REASON): not requeued (it would fail \
again; see above)" ;;
    cancelled) beit3_log "Slurm is ending the job (exit code $rc, $BEIT3_REASON): not requeued; resubmit to \
continue from the last checkpoint" ;;
    cap) beit3_log "exit code $rc ($BEIT3_REASON), but BEIT3_MAX_REQUEUES=$BEIT3_MAX_REQUEUES requeues are \
used up: resubmit the same script to continue from the checkpoint" ;;
    budget) beit3_log "exit code $rc ($BEIT3_REASON): the failure budget \
BEIT3_MAX_FAILURES=$BEIT3_MAX_FAILURES is used up: not requeued; see attempts.tsv and the logs before \
resubmitting" ;;
    requeue)
      if [[ $BEIT3_REASON == preempted ]]; then
        beit3_log "checkpoint saved: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
      else
        beit3_log "exit code $rc ($BEIT3_REASON): failure $(($(beit3_failures_so_far))) of \
BEIT3_MAX_FAILURES=$BEIT3_MAX_FAILURES; requeueing job $SLURM_JOB_ID (restart $((restarts + 1))) \
to resume from the last checkpoint${BEIT3_FAILED_NODES:+ (failed node: $BEIT3_FAILED_NODES)}"
        [[ -n $BEIT3_FAILED_NODES ]] && beit3_exclude_nodes "$BEIT3_FAILED_NODES"
      fi
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
  beit3_fault_env
  beit3_rendezvous
  beit3_program_args
  beit3_step_command
  cd "$BEIT3_REPO" || beit3_die "cannot enter BEIT3_REPO=$BEIT3_REPO"
  beit3_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
    "nodes=$SLURM_JOB_NUM_NODES tasks=${SLURM_NTASKS:-?} MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  beit3_log "run dir $BEIT3_RUN_DIR"
  beit3_log "step: ${BEIT3_STEP[*]}"
  local rc=0
  BEIT3_ATTEMPT_START=$(beit3_now)
  if ((BEIT3_SIGNALS > 0)); then
    # Asked to stop before any training ran: nothing to save, so the step is not started (its programs
    # could not yet act on the signal); the attempt counts as preempted and is requeued like one.
    beit3_log "the stop signal came before the training step started: not starting it"
    BEIT3_PREEMPTED_BEFORE_STEP=1
    rc=$BEIT3_EXIT_PREEMPTED
  else
    beit3_run_step "${BEIT3_STEP[@]}" || rc=$?
    beit3_log "training step exited with code $rc"
  fi
  beit3_finish "$rc"
}
