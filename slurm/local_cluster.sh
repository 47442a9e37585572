#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests of srun/sbatch (run as root; Debian's slurm-wlm and munge).
#   slurm/local_cluster.sh start DIR   writes DIR/slurm.conf, starts munged, slurmctld and slurmd, waits until idle
#   slurm/local_cluster.sh stop DIR    cancels the jobs left, then stops them (munged too, where start started it)
# Client commands need SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf

case $cmd in
start)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" /run/munge
    host=$(hostname -s)
    cpus=$(nproc)
    cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then  # ours to stop, then; one already running (the machine's) is left alone
        runuser -u munge -- munged
        cp /run/munge/munged.pid "$dir/munged.pid" 2>/dev/null || pgrep -nx munged > "$dir/munged.pid"
    fi
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -q idle; then exit 0; fi
        sleep 0.5
    done
    echo "slurm did not come up; logs in $dir/log" >&2
    sinfo >&2 || true
    exit 1
    ;;
stop)
    # the jobs first: tasks still running when slurmd goes would be left behind
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 80); do  # KillWait=30: a task that ignores SIGTERM gets SIGKILL 30 s later
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    scontrol shutdown >/dev/null 2>&1 || true
    for f in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    if [ -f "$dir/munged.pid" ]; then  # the one start started, not another cluster's
        kill "$(cat "$dir/munged.pid")" 2>/dev/null || true
        rm -f "$dir/munged.pid"
    fi
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
