#!/usr/bin/env bash
# A one-node Slurm 22.05 cluster for gridrunner's tests, built from Debian's
# packages (install them with .ci/install-slurm.sh) and run as root.
#
#   cluster.sh start    wipe the cluster directory, start every daemon, wait for an idle node
#   cluster.sh stop     cancel all jobs, kill their processes, stop every daemon
#   cluster.sh status   print each daemon's state; exit 0 only if all run and the node answers
#   cluster.sh env      print the exports a client shell needs: eval "$(cluster.sh env)"
#   cluster.sh check    exit 0 if this machine can run the cluster (packages, root), else say why
#
# Every config, log, pid, socket, spool, state and database file lives under
# $GRIDRUNNER_SLURM_DIR (default /tmp/gridrunner-slurm):
#
#   etc/    slurm.conf, slurmdbd.conf (mode 600), plugstack.conf, munge.key (mode 600)
#   run/    pid files, munge/ (socket directory, mode 755), mariadbd.sock
#   log/    one log per daemon, plus what each printed while starting (*.out)
#   spool/  slurmctld state, slurmd spool
#   db/     the private MariaDB data directory
#
# Ports: $GRIDRUNNER_SLURM_PORT (default 16817) for slurmctld, +1 slurmd, +2 slurmdbd,
# +3 mariadbd (127.0.0.1 only), so the cluster leaves any system Slurm alone.
#
# Why the settings are what they are (each one was measured on this machine kind):
# - Accounting goes through slurmdbd into MariaDB because submitit reads job states
#   only through sacct; without it every state stays UNKNOWN.
# - proctrack/pgid with task/none: with linuxproc a cancelled job's steps escaped to PID 1.
# - config_overrides with 8 CPUs: 8 concurrent array tasks on a 2-core machine.
# - KillWait=5: submitit ignores SIGTERM, so every cancel would otherwise take 30 s.
# - sched_interval=2 and cred_expire=10: a requeued job restarts in about 15 s, not 2 min.
# - A non-default munge socket must be named in AccountingStoragePass as well as
#   AuthInfo, because slurmctld's connection to slurmdbd takes it from there.
#
# Every daemon is started with GRIDRUNNER_SLURM_DAEMON_OF=<cluster dir> in a clean
# environment, and every job of the cluster has SLURM_CONF=<cluster dir>/etc/slurm.conf
# and SLURM_JOB_ID in its environment; `stop` finds leftovers by these. Stopped
# daemons stay zombies until PID 1 reaps them, so liveness means "in /proc and not
# in state Z", never `kill -0`.
set -euo pipefail

readonly CLUSTER_DIR="${GRIDRUNNER_SLURM_DIR:-/tmp/gridrunner-slurm}"
readonly PORT_BASE="${GRIDRUNNER_SLURM_PORT:-16817}"
readonly CONF="$CLUSTER_DIR/etc/slurm.conf"
readonly MUNGE_SOCKET="$CLUSTER_DIR/run/munge/munge.socket.2"
readonly MARIADB_SOCKET="$CLUSTER_DIR/run/mariadbd.sock"
readonly MARKER="$CLUSTER_DIR/.gridrunner-slurm"
readonly CTLD_PORT=$PORT_BASE SLURMD_PORT=$((PORT_BASE + 1))
readonly DBD_PORT=$((PORT_BASE + 2)) MARIADB_PORT=$((PORT_BASE + 3))
# Daemons in stop order; start order is the reverse.
readonly DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export SLURM_CONF="$CONF"

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------- processes

# True if the process exists and is not a zombie.
is_alive() {
    local pid=$1 stat
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }   # the command name may hold spaces and parentheses
    [[ "${stat%% *}" != [ZX] ]]
}

pid_file() { echo "$CLUSTER_DIR/run/$1.pid"; }

# The recorded pid of a daemon, if that pid still runs that program.
daemon_pid() {
    local name=$1 file pid comm
    file=$(pid_file "$name")
    [[ -r "$file" ]] || return 1
    pid=$(tr -dc '0-9' < "$file")
    is_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ "$comm" == "$name" ]] || return 1
    echo "$pid"
}

# Wait up to $2 seconds (in tenths: $2*10 polls) for a process to die.
wait_dead() {
    local pid=$1 tenths=$(($2 * 10))
    while ((tenths-- > 0)); do
        is_alive "$pid" || return 0
        sleep 0.1
    done
    ! is_alive "$pid"
}

stop_daemon() {
    local name=$1 timeout=$2 pid
    pid=$(daemon_pid "$name") || { rm -f "$(pid_file "$name")"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_dead "$pid" "$timeout"; then
        say "$name (pid $pid) ignored SIGTERM for ${timeout}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_dead "$pid" 5 || say "$name (pid $pid) survived SIGKILL"
    fi
    rm -f "$(pid_file "$name")"
}

# This script and its ancestors carry SLURM_CONF too when run from a test; never kill them.
ancestors() {
    local pid=$$ stat
    while [[ "$pid" =~ ^[0-9]+$ ]] && ((pid > 1)); do
        echo "$pid"
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || break
        stat=${stat##*) }
        pid=$(echo "$stat" | cut -d' ' -f2)
    done
}

# Pids of live processes whose environment holds every one of the given lines
# (a line ending in '=' matches any value).
pids_with_env() {
    local files=(/proc/[0-9]*/environ) pattern
    local -a matching=("${files[@]}")
    for pattern in "$@"; do
        ((${#matching[@]})) || break
        if [[ "$pattern" == *= ]]; then
            mapfile -t matching < <(grep -lzs -- "^${pattern}" "${matching[@]}" || true)
        else
            mapfile -t matching < <(grep -lzsxF -- "$pattern" "${matching[@]}" || true)
        fi
    done
    local file pid
    for file in "${matching[@]}"; do
        pid=${file#/proc/}
        pid=${pid%/environ}
        is_alive "$pid" && echo "$pid"
    done
    return 0
}

# SIGKILL the given processes, except this script and its ancestors; repeat until none is left.
kill_all() {
    local description=$1; shift
    local -a pids
    local self round pid
    self=" $(ancestors | tr '\n' ' ') "
    for round in 1 2 3 4 5; do
        pids=()
        for pid in $("$@"); do
            [[ "$self" == *" $pid "* ]] || pids+=("$pid")
        done
        ((${#pids[@]})) || return 0
        ((round > 1)) || say "killing $description: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.2
    done
    say "could not kill $description: ${pids[*]}"
}

job_processes() { pids_with_env "SLURM_CONF=$CONF" "SLURM_JOB_ID="; }
step_daemons() {
    local pid
    for pid in $(pids_with_env "GRIDRUNNER_SLURM_DAEMON_OF=$CLUSTER_DIR"); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] && echo "$pid"
    done
    return 0
}
cluster_processes() { pids_with_env "GRIDRUNNER_SLURM_DAEMON_OF=$CLUSTER_DIR"; }

# Start a daemon in a clean environment, detached from the caller's terminal and pipes.
launch() {
    local name=$1; shift
    env -i PATH="/usr/sbin:/usr/bin:/sbin:/bin" HOME="${HOME:-/root}" LANG=C.UTF-8 \
        SLURM_CONF="$CONF" GRIDRUNNER_SLURM_DAEMON_OF="$CLUSTER_DIR" \
        setsid "$@" </dev/null >>"$CLUSTER_DIR/log/$name.out" 2>&1 &
}

# Poll a command for up to $2 seconds; on timeout show the daemon's log and fail.
wait_for() {
    local what=$1 seconds=$2 log=$3; shift 3
    local tenths=$((seconds * 10))
    until "$@" >/dev/null 2>&1; do
        if ((tenths-- <= 0)); then
            say "timed out after ${seconds}s waiting for $what; last lines of $log:"
            tail -n 20 "$log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.1
    done
}

# ---------------------------------------------------------------- checks

check_prerequisites() {
    local missing=() program
    for program in munged mariadbd mariadb-install-db mariadb-admin slurmdbd slurmctld slurmd \
        sinfo squeue sbatch scancel sacct sacctmgr; do
        command -v "$program" >/dev/null || missing+=("$program")
    done
    if ((${#missing[@]})); then
        die "Slurm packages are missing (no ${missing[*]}); install them with .ci/install-slurm.sh (as root)"
    fi
    [[ $(id -u) -eq 0 ]] || die "the test cluster runs its daemons as root; run as root"
    local version
    version=$(slurmctld -V 2>/dev/null || true)
    [[ "$version" == "slurm"*" 22.05."* ]] || say "warning: expected Slurm 22.05, found '$version'"
}

check_ports_free() {
    local port
    for port in $CTLD_PORT $SLURMD_PORT $DBD_PORT $MARIADB_PORT; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is in use; choose other ports with GRIDRUNNER_SLURM_PORT (now $PORT_BASE)"
        fi
    done
}

# Refuse to wipe a directory that this script did not create.
prepare_dir() {
    if [[ -e "$CLUSTER_DIR" && ! -e "$MARKER" ]]; then
        if [[ -n "$(ls -A "$CLUSTER_DIR" 2>/dev/null)" ]]; then
            die "$CLUSTER_DIR exists and is not a gridrunner test cluster; refusing to wipe it"
        fi
    fi
    rm -rf "$CLUSTER_DIR"
    mkdir -p "$CLUSTER_DIR"/{etc,run/munge,log,spool/ctld,spool/d,db}
    chmod 755 "$CLUSTER_DIR" "$CLUSTER_DIR/etc" "$CLUSTER_DIR/run" "$CLUSTER_DIR/run/munge"
    echo "gridrunner test cluster; tests/slurm/cluster.sh wipes this directory on start" > "$MARKER"
}

# ---------------------------------------------------------------- configuration

write_config() {
    local host memory_mb
    host=$(hostname -s)
    memory_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))

    head -c 1024 /dev/urandom > "$CLUSTER_DIR/etc/munge.key"
    chmod 600 "$CLUSTER_DIR/etc/munge.key"
    : > "$CLUSTER_DIR/etc/plugstack.conf"

    cat > "$CONF" <<EOF
# Written by tests/slurm/cluster.sh; rewritten on every start.
ClusterName=gridrunner
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge

StateSaveLocation=$CLUSTER_DIR/spool/ctld
SlurmdSpoolDir=$CLUSTER_DIR/spool/d
SlurmctldPidFile=$CLUSTER_DIR/run/slurmctld.pid
SlurmdPidFile=$CLUSTER_DIR/run/slurmd.pid
SlurmctldLogFile=$CLUSTER_DIR/log/slurmctld.log
SlurmdLogFile=$CLUSTER_DIR/log/slurmd.log
PlugStackConfig=$CLUSTER_DIR/etc/plugstack.conf
MailProg=/bin/true

ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
KillWait=5
InactiveLimit=0
MaxArraySize=10001
MaxJobCount=50000

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none

NodeName=$host NodeAddr=127.0.0.1 CPUs=8 RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    cat > "$CLUSTER_DIR/etc/slurmdbd.conf" <<EOF
# Written by tests/slurm/cluster.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$CLUSTER_DIR/run/slurmdbd.pid
LogFile=$CLUSTER_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CLUSTER_DIR/etc/slurmdbd.conf"
}

# ---------------------------------------------------------------- commands

node_idle() { [[ "$(sinfo -h -N -o '%t' 2>/dev/null)" == idle ]]; }
slurmdbd_answers() { sacctmgr -n -P list cluster format=cluster; }
mariadb_answers() { mariadb-admin --no-defaults --socket="$MARIADB_SOCKET" -uroot ping; }

start() {
    check_prerequisites
    stop quiet
    check_ports_free
    prepare_dir
    # A half-started cluster is stopped again; its logs stay for the post-mortem.
    trap 'if (($? != 0)); then say "start failed; stopping what had started"; stop quiet; fi' EXIT
    write_config
    local dir=$CLUSTER_DIR

    launch munged munged --force --socket="$MUNGE_SOCKET" --key-file="$dir/etc/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/run/munged.seed"
    wait_for munged 10 "$dir/log/munged.log" test -S "$MUNGE_SOCKET"

    # A throwaway database: no fsync (on this disk fsyncs made the bootstrap take
    # 2-5 s instead of under 1 s) and a small redo log. slurmdbd.log therefore says
    # "Database settings not recommended values"; that is expected.
    local innodb_options=(--innodb-flush-method=nosync --innodb-doublewrite=0
        --innodb-flush-log-at-trx-commit=0 --innodb-log-file-size=8M)
    mariadb-install-db --no-defaults --user=root --datadir="$dir/db" --skip-test-db \
        --auth-root-authentication-method=normal "${innodb_options[@]}" \
        > "$dir/log/mariadb-install-db.log" 2>&1 \
        || { tail -n 20 "$dir/log/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$dir/db" \
        --bind-address=127.0.0.1 --port="$MARIADB_PORT" --socket="$MARIADB_SOCKET" \
        --pid-file="$(pid_file mariadbd)" --log-error="$dir/log/mariadbd.log" \
        "${innodb_options[@]}" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
    wait_for mariadbd 30 "$dir/log/mariadbd.log" mariadb_answers

    launch slurmdbd slurmdbd
    wait_for slurmdbd 30 "$dir/log/slurmdbd.log" slurmdbd_answers

    launch slurmctld slurmctld
    launch slurmd slurmd
    wait_for "an idle node in sinfo" 60 "$dir/log/slurmctld.log" node_idle

    local name
    for name in "${DAEMONS[@]}"; do
        daemon_pid "$name" >/dev/null || die "$name is not running; see $dir/log/$name.log"
    done
    say "started in ${SECONDS}s in $dir (SLURM_CONF=$CONF)"
}

stop() {
    local quiet=${1:-}
    if [[ ! -e "$MARKER" ]]; then
        # Nothing recorded (or the directory was deleted under a running cluster):
        # only the processes that carry this directory in their environment can go.
        kill_all "processes of a cluster in $CLUSTER_DIR" cluster_processes
        kill_all "job processes of a cluster in $CLUSTER_DIR" job_processes
        [[ -n "$quiet" ]] || say "no cluster in $CLUSTER_DIR"
        return 0
    fi
    if daemon_pid slurmctld >/dev/null; then
        local -a jobs
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
        if ((${#jobs[@]})); then
            scancel "${jobs[@]}" 2>/dev/null || true
            # Jobs that ignore SIGTERM (submitit's do) would hold the cancel for
            # KillWait seconds; a teardown need not wait for that.
            kill_all "running job processes" job_processes
            local tenths=100
            while ((tenths-- > 0)) && [[ -n "$(squeue -h -o %A 2>/dev/null)" ]]; do sleep 0.1; done
        fi
    fi
    stop_daemon slurmd 10
    kill_all "leftover job processes" job_processes
    kill_all "leftover slurmstepd" step_daemons
    stop_daemon slurmctld 10
    stop_daemon slurmdbd 10
    stop_daemon mariadbd 30
    # munged goes last: without it slurmd could not exit.
    stop_daemon munged 10
    kill_all "leftover processes of the cluster" cluster_processes
    kill_all "leftover job processes" job_processes
    [[ -n "$quiet" ]] || say "stopped (logs are kept in $CLUSTER_DIR/log)"
}

status() {
    local name pid ok=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if ((ok == 0)); then
        sinfo -N -o '%N %t %c %m' || ok=1
        [[ "$(sinfo -h -N -o '%t' 2>/dev/null)" =~ ^(idle|mix|alloc|comp)$ ]] || ok=1
    fi
    return $ok
}

print_env() {
    printf 'export GRIDRUNNER_SLURM_DIR=%q\n' "$CLUSTER_DIR"
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) print_env ;;
    check) check_prerequisites ;;
    *)
        echo "usage: $0 start|stop|status|env|check   (cluster directory: \$GRIDRUNNER_SLURM_DIR, now $CLUSTER_DIR)" >&2
        exit 2
        ;;
esac
