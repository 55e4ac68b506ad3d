#!/usr/bin/env bash
# One task of the training step (started by srun from slurm/common.sh): runs the command given, then leaves
# "node<TAB>exit code" in $BEIT3_TASK_DIR/<task id>, so that the batch shell can tell a rank killed by a
# signal, and the node it ran on, from the ranks that failed after it (docs/slurm.md, "Requeue").
#
# Usage: task.sh COMMAND ARGS...   (exit code: the command's; 128+N if a signal N ended it)

# The step's USR1 and TERM reach every process of the step. This shell must outlive them to write the
# record, so it catches them and does nothing (a caught signal is reset to its default in the command it
# starts, so the program installs its own handler as usual).
trap : USR1 TERM

"$@"
rc=$?
if [[ -n ${BEIT3_TASK_DIR:-} ]]; then
  id=${SLURM_PROCID:-0}
  printf '%s\t%s\n' "${SLURMD_NODENAME:-$(hostname)}" "$rc" >"$BEIT3_TASK_DIR/$id.tmp" \
    && mv -f "$BEIT3_TASK_DIR/$id.tmp" "$BEIT3_TASK_DIR/$id"
fi
exit "$rc"
