#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine, for testing `sbatch slurm/*.sh` unchanged.
#
#   tests/slurm/cluster.sh start DIR [--owner PID]   # DIR: an empty or missing folder (made 0755)
#   tests/slurm/cluster.sh stop DIR
#   tests/slurm/cluster.sh status DIR
#
# Then `export SLURM_CONF=DIR/slurm.conf` and use sbatch/squeue/scontrol as usual (`start` prints it).
#
# Everything listens on 127.0.0.1 (own free ports): a private munged, slurmctld, and one slurmd per
# node, each in `unshare --uts --mount` with its own hostname (node1, node2, ...) and a private hosts
# file bind-mounted over /etc/hosts inside that mount namespace (the host's /etc is never modified).
# No network namespaces, bridges or private addresses. Fake GPUs: gres.conf files that are /dev/null
# aliases (`mknod c 1 3`), so `--gpus-per-node=N` schedules; torch.cuda stays unavailable.
# `SlurmdParameters=config_overrides` lets each node advertise more CPUs than the machine has.
# All state lives in DIR. `stop` ends jobs, then daemons by their PID files (checking /proc/PID/exe),
# then any leftover job processes inside the nodes' private mount namespaces; never by process name.
# `--owner PID` starts a watchdog that stops the cluster when PID exits (e.g. a killed test runner).
#
# Knobs (environment): S4V_CLUSTER_NODES (2), S4V_CLUSTER_CPUS (16 per node), S4V_CLUSTER_GPUS (8 per
# node), S4V_CLUSTER_CRED_EXPIRE (10 s: also the requeue delay), S4V_CLUSTER_INSTALL (1: apt-get
# install Slurm and munge if missing). Needs root. Exit status 3: the install failed.
set -euo pipefail

NODES=${S4V_CLUSTER_NODES:-2}
CPUS=${S4V_CLUSTER_CPUS:-16}
GPUS=${S4V_CLUSTER_GPUS:-8}
# A requeued job may start again only cred_expire + 1 s later (Slurm's default: 120 s).
CRED_EXPIRE=${S4V_CLUSTER_CRED_EXPIRE:-10}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

install_slurm() {
    local missing=0 b
    for b in slurmctld slurmd sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    [[ ${S4V_CLUSTER_INSTALL:-1} == 1 ]] || die "Slurm/munge not installed (S4V_CLUSTER_INSTALL=0)"
    log "installing Slurm and munge with apt-get"
    # The packages' postinst cannot start services (no init system / policy-rc.d): fine, we start by hand.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >&2; }; then
        echo "cluster.sh: apt-get install of slurmctld slurmd slurm-client munge failed" >&2
        exit 3  # the tests skip on this code
    fi
}

free_ports() {  # N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# PID from a pid file, only if that process is alive and runs the expected executable.
pid_of() {  # pid_of FILE EXE_BASENAME
    local file=$1 want=$2 pid exe
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe##*/}
    exe=${exe% (deleted)}
    # Debian's binaries are slurmctld-wlm and slurmd-wlm (behind alternatives links)
    [[ $exe == "$want" || $exe == "$want-wlm" ]] || return 1
    echo "$pid"
}

wait_gone() {  # wait_gone SECONDS PID...
    local deadline=$((SECONDS + $1)) p alive
    shift
    while ((SECONDS < deadline)); do
        alive=0
        for p in "$@"; do [[ -d /proc/$p ]] && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    return 1
}

start() {
    local dir=$1 owner=${2:-}
    [[ $(id -u) == 0 ]] || die "needs root (slurmd runs jobs as root here, and unshare/mount need it)"
    install_slurm
    export PATH=$PATH:/usr/sbin:/sbin
    mkdir -p "$dir"
    dir=$(readlink -f "$dir")
    [[ -e $dir/slurm.conf ]] && die "$dir already holds a cluster (stop it first)"
    chmod 0755 "$dir"
    mkdir -p "$dir"/{state,spool,run,log,dev,munge}
    local n i ports ctl_port host
    host=$(hostname -s)
    read -r -a ports <<<"$(free_ports $((NODES + 1)))"
    ctl_port=${ports[0]}

    # munge: own key, socket, pid file; run as the munge user (munged refuses unsafe ownership).
    chown munge: "$dir/munge" && chmod 0755 "$dir/munge"  # munged wants the socket dir o+x
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chown munge: "$dir/munge/munge.key" && chmod 0400 "$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" --num-threads=2 \
        || die "munged failed to start: $(tail -n 5 "$dir/munge/munged.log" 2>/dev/null)"

    # fake GPU devices (aliases of /dev/null), one set per node
    local gres_files
    for ((i = 0; i < GPUS; i++)); do
        [[ -e $dir/dev/nvidia$i ]] || mknod "$dir/dev/nvidia$i" c 1 3
    done
    gres_files="$dir/dev/nvidia[0-$((GPUS - 1))]"

    {
        echo "127.0.0.1 localhost $host"
        for ((n = 1; n <= NODES; n++)); do echo "127.0.0.1 node$n"; done
    } >"$dir/hosts"

    cat >"$dir/slurm.conf" <<EOF
ClusterName=s4vci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=$CRED_EXPIRE
SlurmctldPort=$ctl_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
MinJobAge=300
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName=DEFAULT CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=8000 Gres=gpu:$GPUS State=UNKNOWN
EOF
    for ((n = 1; n <= NODES; n++)); do
        echo "NodeName=node$n NodeHostname=node$n NodeAddr=127.0.0.1 Port=${ports[n]}" >>"$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
    echo "Name=gpu File=$gres_files" >"$dir/gres.conf"
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"
    export SLURM_CONF=$dir/slurm.conf

    # setsid -f: a timeout that kills the caller's process group does not take the daemons down.
    setsid -f slurmctld -D -f "$SLURM_CONF" </dev/null >>"$dir/log/slurmctld.out" 2>&1
    for ((n = 1; n <= NODES; n++)); do
        # A wrapper that writes its PID, gets its own hostname and hosts file, then execs slurmd
        # (same PID): jobs started by that slurmd live in its UTS and mount namespaces.
        # shellcheck disable=SC2016  # expanded by the inner bash
        setsid -f unshare --uts --mount --propagation private -- bash -c '
            set -e
            echo $$ >"$1/run/node$2.pid"
            readlink /proc/self/ns/mnt >"$1/run/node$2.mntns"
            hostname "node$2"
            mount --bind "$1/hosts" /etc/hosts
            exec slurmd -D -f "$3" -N "node$2"' _ "$dir" "$n" "$SLURM_CONF" \
            </dev/null >>"$dir/log/slurmd-node$n.out" 2>&1
    done
    if [[ -n $owner ]]; then
        # shellcheck disable=SC2016  # expanded by the inner bash
        setsid -f bash -c 'echo $$ >"$4"; while [[ -d /proc/$1 ]]; do sleep 1; done; exec "$2" stop "$3"' \
            s4v-cluster-watchdog "$owner" "$SELF" "$dir" "$dir/run/watchdog.pid" \
            </dev/null >>"$dir/log/watchdog.out" 2>&1
    fi

    # Wait until every node is idle.
    local deadline=$((SECONDS + 60)) states
    while :; do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
        if [[ $(grep -c ' idle$' <<<"$states") == "$NODES" ]]; then break; fi
        if ((SECONDS > deadline)); then
            log "nodes not idle after 60 s: ${states:-no answer from slurmctld}"
            tail -n 20 "$dir"/log/*.log >&2 || true
            stop "$dir" || true
            exit 1
        fi
        sleep 0.2
    done
    log "cluster up in $dir: $NODES nodes x $CPUS CPUs x $GPUS fake GPUs, slurmctld on 127.0.0.1:$ctl_port"
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir
    dir=$(readlink -f "$1")
    [[ -f $dir/slurm.conf ]] || { log "no cluster in $dir"; return 0; }
    export PATH=$PATH:/usr/sbin:/sbin
    export SLURM_CONF=$dir/slurm.conf
    local pid pids=() f n ns self_ns
    # Jobs first, so slurmd can clean up its steps.
    if pid_of "$dir/run/slurmctld.pid" slurmctld >/dev/null; then
        if [[ -n $(timeout 10 squeue -h -o %A 2>/dev/null) ]]; then
            timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
            local deadline=$((SECONDS + 8))
            while ((SECONDS < deadline)) && [[ -n $(timeout 5 squeue -h -t running,completing -o %A 2>/dev/null) ]]; do
                sleep 0.2
            done
        fi
    fi
    # Daemons, by their own PID files (the exe check guards against reused PIDs).
    for ((n = 1; n <= 64; n++)); do
        f=$dir/run/node$n.pid
        [[ -e $f ]] || break
        pid=$(pid_of "$f" slurmd) && pids+=("$pid")
    done
    pid=$(pid_of "$dir/run/slurmctld.pid" slurmctld) && pids+=("$pid")
    pid=$(pid_of "$dir/munge/munged.pid" munged) && pids+=("$pid")
    if [[ -s $dir/run/watchdog.pid ]]; then
        pid=$(pid_of "$dir/run/watchdog.pid" bash) && [[ $pid != "$$" && $pid != "$PPID" ]] && pids+=("$pid")
    fi
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" || true
    fi
    # Leftovers (slurmstepd, job tasks) in the nodes' private mount namespaces.
    self_ns=$(readlink /proc/self/ns/mnt)
    local leftovers=()
    for f in "$dir"/run/node*.mntns; do
        [[ -s $f ]] || continue
        ns=$(<"$f")
        [[ $ns == "$self_ns" ]] && continue  # never the host's namespace
        for p in /proc/[0-9]*; do
            [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$ns" ]] && leftovers+=("${p#/proc/}")
        done
    done
    if ((${#leftovers[@]})); then
        log "ending ${#leftovers[@]} leftover process(es) of the nodes: ${leftovers[*]}"
        kill -KILL "${leftovers[@]}" 2>/dev/null || true
        wait_gone 5 "${leftovers[@]}" || true
    fi
    mv "$dir/slurm.conf" "$dir/slurm.conf.stopped"
    log "cluster in $dir stopped"
}

status() {
    local dir
    dir=$(readlink -f "$1")
    export PATH=$PATH:/usr/sbin:/sbin SLURM_CONF=$dir/slurm.conf
    [[ -f $SLURM_CONF ]] || die "no cluster in $dir"
    sinfo -N
    squeue
}

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || die "usage: $0 start|stop|status DIR [--owner PID]"
case $cmd in
start)
    owner=
    if [[ ${3:-} == --owner ]]; then owner=${4:?--owner needs a PID}; fi
    start "$dir" "$owner"
    ;;
stop) stop "$dir" ;;
status) status "$dir" ;;
*) die "unknown command $cmd (start, stop, status)" ;;
esac
