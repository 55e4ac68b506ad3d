#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for the sbatch tests and CI (see docs/slurm.md).
#
# Usage: bash scripts/slurm_localhost.sh {start|stop|status|env}
#   start   writes slurm.conf under $BEIT3_SLURM_DIR, starts a munged, slurmctld and slurmd of its own, and
#           waits until the node is idle; prints the line to eval so that sbatch/squeue find the cluster.
#   stop    cancels every job, waits for an empty queue, shuts the daemons down, ends its munged and removes
#           the scratch folder so the next start is clean.
#   status  prints the node state (exit 1 if the controller does not answer).
#   env     prints `export SLURM_CONF=...` for eval.
#
# Environment: BEIT3_SLURM_DIR (scratch folder, default /tmp/beit3-slurm), BEIT3_SLURM_CTLD_PORT (6817),
# BEIT3_SLURM_SLURMD_PORT (6818), BEIT3_SLURM_START_TIMEOUT (seconds, default 60).
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge
# (scripts/install.sh --tests). Runs without systemd and without cgroups (linuxproc, task/none).
set -euo pipefail

DIR=${BEIT3_SLURM_DIR:-/tmp/beit3-slurm}
CTLD_PORT=${BEIT3_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${BEIT3_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT=${BEIT3_SLURM_START_TIMEOUT:-60}
export SLURM_CONF=$DIR/slurm.conf
# Each cluster has its own munged on its own socket, so that two clusters (two test sessions at once) never
# stop each other's authentication, and the machine's own munged (if any) is left alone. The socket lives
# under /run because munged runs as the munge user, who cannot enter root-only scratch folders.
MUNGE_DIR=/run/beit3-munge/$(echo -n "$DIR" | md5sum | cut -c1-16)
MUNGE_SOCKET=$MUNGE_DIR/munge.socket

die() {
  echo "slurm_localhost.sh: $*" >&2
  exit 1
}

check_prerequisites() {
  [[ $(id -u) == 0 ]] || die "must run as root (slurmd runs jobs as their submitting user and needs root)"
  local tool
  for tool in munged munge slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$tool" >/dev/null \
      || die "$tool not found: install Slurm with 'apt-get install -y slurmctld slurmd slurm-client munge' \
(or bash scripts/install.sh --tests)"
  done
  [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing: reinstall the munge package"
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  local cpus mem_mb
  cpus=$(nproc)
  # 90% of the machine's memory, so the node never registers more than slurmd can see (else it drains).
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_localhost.sh: a one-node test cluster. Plugins need neither cgroups nor systemd.
ClusterName=beit3test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is otherwise held about two minutes (credential expiry) before it may start again.
AuthInfo=cred_expire=5,socket=$MUNGE_SOCKET
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# A full scheduling pass every 2 s instead of 60 keeps the tests fast.
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
OverTimeLimit=0
# Finished jobs stay visible to 'scontrol show job' for the tests' checks.
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_works() {
  munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1
}

start_munge() {
  install -d -o root -g root -m 0755 /run/beit3-munge
  rm -rf "$MUNGE_DIR"
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  chown munge:munge /etc/munge/munge.key
  chmod 0600 /etc/munge/munge.key
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  for _ in $(seq 50); do
    munge_works && break
    sleep 0.1
  done
  munge_works || die "munged did not start: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
  cp "$MUNGE_DIR/munged.pid" "$DIR/munged.pid"
}

controller_alive() {
  [[ -f $DIR/slurmctld.pid ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null
}

node_state() {
  sinfo -h -n localhost -o %T 2>/dev/null | head -n1
}

start() {
  check_prerequisites
  # Ask the controller only if its pid is alive: 'scontrol ping' with no controller hangs about 60 s.
  if controller_alive && scontrol ping >/dev/null 2>&1; then
    echo "already running (SLURM_CONF=$SLURM_CONF): $(node_state)"
    return 0
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  write_conf
  start_munge
  # -c: ignore any saved state; -N: the node name is 'localhost', not the machine's hostname.
  slurmctld -c
  slurmd -N localhost
  local deadline=$((SECONDS + START_TIMEOUT)) state=""
  while ((SECONDS < deadline)); do
    state=$(node_state)
    [[ $state == idle ]] && break
    sleep 0.5
  done
  if [[ $state != idle ]]; then
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node did not become idle within ${START_TIMEOUT}s (state '${state:-none}'); logs above"
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  if [[ ! -f $SLURM_CONF ]]; then
    echo "not running (no $SLURM_CONF)"
    return 0
  fi
  if controller_alive; then
    # scontrol shutdown leaves running jobs alive under linuxproc: cancel them and wait for an empty queue.
    scancel --full --quiet --user=root || true
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)) && [[ -n $(squeue -h -t PD,R,CG,S,RQ,RS -o %i 2>/dev/null) ]]; do
      sleep 0.5
    done
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  local f pid
  for f in slurmctld.pid slurmd.pid munged.pid; do
    [[ -f $DIR/$f ]] || continue
    pid=$(cat "$DIR/$f")
    [[ -n $pid ]] || continue
    [[ $f == munged.pid ]] && kill "$pid" 2>/dev/null
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  done
  rm -rf "$DIR" "$MUNGE_DIR"
  echo "stopped"
}

status() {
  if ! { controller_alive && scontrol ping >/dev/null 2>&1; }; then
    echo "controller not answering (SLURM_CONF=$SLURM_CONF)"
    return 1
  fi
  echo "node localhost: $(node_state)"
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) die "usage: $0 {start|stop|status|env}" ;;
esac
