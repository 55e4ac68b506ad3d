#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, or a multi-node one made of network namespaces, for the sbatch
# tests and CI (see docs/slurm.md).
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
# BEIT3_SLURM_SLURMD_PORT (6818), BEIT3_SLURM_START_TIMEOUT (seconds, default 60), BEIT3_SLURM_NODES (1).
#
# BEIT3_SLURM_NODES=N (N >= 2) makes N nodes b3n1..b3nN, each a network namespace with its own hostname (a
# UTS namespace), address (a veth pair on a bridge; the controller listens on the bridge's address) and
# slurmd (own spool, pid and log files); munged is shared through its socket. Node names resolve through
# /etc/netns/<namespace>/hosts, bound over /etc/hosts inside each node only (a mount namespace), so the
# machine's /etc/hosts is never edited. `stop` removes the namespaces, the bridge and those files. If the
# kernel refuses namespaces, start exits with code 3 and says why. Needs iproute2 (ip) and unshare.
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge
# (scripts/install.sh --tests). Runs without systemd and without cgroups (linuxproc, task/none).
set -euo pipefail

DIR=${BEIT3_SLURM_DIR:-/tmp/beit3-slurm}
CTLD_PORT=${BEIT3_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${BEIT3_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT=${BEIT3_SLURM_START_TIMEOUT:-60}
export SLURM_CONF=$DIR/slurm.conf
# What a cluster keeps outside its scratch folder is named after the folder (its md5), so two never meet.
DIR_HASH=$(echo -n "$DIR" | md5sum | cut -c1-16)
# Each cluster has its own munged on its own socket, so that two clusters (two test sessions at once) never
# stop each other's authentication, and the machine's own munged (if any) is left alone. The socket lives
# under /run because munged runs as the munge user, who cannot enter root-only scratch folders.
MUNGE_DIR=/run/beit3-munge/$DIR_HASH
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
# slurmd's spool holds slurmstepd's Unix sockets (<spool>/<node>_<job>.<step>), whose paths may not exceed
# 108 bytes: a scratch folder deep in a test's temporary tree (pytest-xdist's popen-gw0/...) would pass it
# and every job would fail to launch. So the spool is a short folder named after the scratch folder.
SPOOL_DIR=/run/beit3-slurm/$DIR_HASH
NODES=${BEIT3_SLURM_NODES:-1}
# Multi-node names: derived from the scratch folder, so that two clusters never share a namespace or bridge.
TAG=${DIR_HASH:0:6}
NET=10.213.$((16#${TAG:0:2}))
CTL_ADDR=$NET.1
BRIDGE=b3br$TAG
node_name() { echo "b3n$1"; }
node_ns() { echo "b3-$TAG-n$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

die() {
  echo "slurm_localhost.sh: $*" >&2
  exit 1
}

# Exit code 3: this machine cannot make the multi-node cluster (callers skip, naming the reason).
refuse() {
  echo "slurm_localhost.sh: $*" >&2
  teardown_network
  exit 3
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
  [[ $NODES =~ ^[1-9][0-9]?$ ]] || die "BEIT3_SLURM_NODES=$NODES must be a number from 1 to 99"
  if ((NODES > 1)); then
    command -v ip >/dev/null || refuse "ip not found: install iproute2 (bash scripts/install.sh --tests)"
    command -v unshare >/dev/null && command -v nsenter >/dev/null \
      || refuse "unshare or nsenter not found (util-linux)"
    local err
    err=$(unshare --uts --net --mount true 2>&1) \
      || refuse "the kernel refuses network/UTS/mount namespaces: $err"
  fi
}

# --- multi-node: one network namespace per node -----------------------------------------------------------
setup_network() {
  local i ns err
  err=$(ip link add "$BRIDGE" type bridge 2>&1) || refuse "cannot create a bridge: $err"
  ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((i = 1; i <= NODES; i++)); do
    ns=$(node_ns "$i")
    mkdir -p "/etc/netns/$ns"
    {
      echo "127.0.0.1 localhost"
      for ((j = 1; j <= NODES; j++)); do echo "$(node_addr "$j") $(node_name "$j")"; done
    } >"/etc/netns/$ns/hosts"
    err=$(ip netns add "$ns" 2>&1) || refuse "cannot create network namespace $ns: $err"
    err=$(ip link add "b3$TAG$i" type veth peer name eth0 netns "$ns" 2>&1) \
      || refuse "cannot create a veth pair into $ns: $err"
    ip link set "b3$TAG$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

# The nodes reach the controller on the bridge (and each other through it).
check_controller_reachable() {
  local ns
  ns=$(node_ns 1)
  for _ in $(seq 50); do
    ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$CTL_ADDR/$CTLD_PORT" 2>/dev/null && return 0
    sleep 0.2
  done
  refuse "node namespace $ns cannot reach the controller at $CTL_ADDR:$CTLD_PORT over the bridge"
}

teardown_network() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^b3-$TAG-n" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf /etc/netns/b3-"$TAG"-n*
  ip link del "$BRIDGE" 2>/dev/null || true
}

# slurmd of node i inside its network namespace, with the node's own hostname (UTS namespace) and its own
# view of /etc/hosts (a mount namespace with the node's hosts file bound over it). Not `ip netns exec`: it
# remounts /sys, which hides the cgroup mounts that slurmd checks at start-up.
start_node() {
  local name ns
  name=$(node_name "$1")
  ns=$(node_ns "$1")
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation slave sh -c \
    "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $name && exec slurmd -N $name" \
    || die "slurmd of $name did not start: $(tail -n 5 "$DIR/log/slurmd-$name.log" 2>/dev/null)"
}

write_conf() {
  rm -rf "$SPOOL_DIR"
  mkdir -p "$DIR/state" "$SPOOL_DIR" "$DIR/log"
  local cpus mem_mb
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
  # 90% of the machine's memory, so the node never registers more than slurmd can see (else it drains).
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  local ctld_host=localhost slurmd_files node_lines partition_nodes=localhost i
  slurmd_files="SlurmdSpoolDir=$SPOOL_DIR
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
  node_lines="NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  if ((NODES > 1)); then
    # The controller runs here and is reached by the nodes at the bridge's address; every node sees the
    # whole machine, so each declares all its CPUs (jobs of the tests use one or two per node).
    ctld_host="localhost($CTL_ADDR)"
    slurmd_files="SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
    node_lines=
    for ((i = 1; i <= NODES; i++)); do
      node_lines+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus \
RealMemory=$((mem_mb / NODES)) State=UNKNOWN"$'\n'
    done
    partition_nodes="b3n[1-$NODES]"
  fi
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_localhost.sh: a test cluster of $NODES node(s). Plugins need neither cgroups nor
# systemd.
ClusterName=beit3test
SlurmctldHost=$ctld_host
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
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_files
$node_lines
PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
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

# "idle" when every node is idle, else the states seen.
node_state() {
  sinfo -h -N -o %T 2>/dev/null | sort -u | paste -sd,
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
  if ((NODES > 1)); then
    teardown_network  # what a killed earlier run of the same folder left
    setup_network
  fi
  write_conf
  start_munge
  # -c: ignore any saved state; -N: the node name is 'localhost', not the machine's hostname.
  slurmctld -c
  if ((NODES > 1)); then
    check_controller_reachable
    for ((i = 1; i <= NODES; i++)); do start_node "$i"; done
  else
    slurmd -N localhost
  fi
  local deadline=$((SECONDS + START_TIMEOUT)) state=""
  while ((SECONDS < deadline)); do
    state=$(node_state)
    [[ $state == idle ]] && break
    sleep 0.5
  done
  if [[ $state != idle ]]; then
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "node did not become idle within ${START_TIMEOUT}s (state '${state:-none}'); logs above"
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  if [[ ! -f $SLURM_CONF ]]; then
    ((NODES > 1)) && teardown_network
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
  for f in slurmctld.pid "$DIR"/slurmd*.pid munged.pid; do
    f=$(basename "$f")
    [[ -f $DIR/$f ]] || continue
    pid=$(cat "$DIR/$f")
    [[ -n $pid ]] || continue
    # slurmd of a namespaced node may outlive 'scontrol shutdown' when it cannot be reached.
    [[ $f == munged.pid || $f == slurmd-* ]] && kill "$pid" 2>/dev/null
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  done
  ((NODES > 1)) && teardown_network
  rm -rf "$DIR" "$MUNGE_DIR" "$SPOOL_DIR"
  echo "stopped"
}

status() {
  if ! { controller_alive && scontrol ping >/dev/null 2>&1; }; then
    echo "controller not answering (SLURM_CONF=$SLURM_CONF)"
    return 1
  fi
  if ((NODES > 1)); then
    sinfo -h -N -o 'node %N: %T'
  else
    echo "node localhost: $(node_state)"
  fi
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) die "usage: $0 {start|stop|status|env}" ;;
esac
