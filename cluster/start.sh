#!/usr/bin/env bash
# Bring up a real SLURM on this one machine: munge, slurmctld, and NODES slurmd daemons (node1..N),
# each its own node with CPUS cpus. Every job gets its own scratch dir on every node as $TMPDIR
# (made by a TaskProlog, wiped by the Epilog when the job ends), as node-local scratch is on a real
# cluster. (Not job_container/tmpfs: its private /tmp would hide a checkout or a venv under /tmp.)
#
#   cluster/install.sh                       once, as root: SLURM, munge (and the other test packages)
#   cluster/start.sh [NODES=2] [CPUS=2]      then: export SLURM_CONF=<printed path>
#   cluster/stop.sh                          ends only the daemons this started
#
# Everything lives under $UNIDASK_SLURM_DIR (default /var/tmp/unidask-slurm). Starting again, or
# after a stale stop, starts fresh.
set -euo pipefail
NODES=${1:-2}
CPUS=${2:-2}
BASE=${UNIDASK_SLURM_DIR:-/var/tmp/unidask-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
# UNIDASK_SLURM_HOSTS=1: every node a separate host of cluster/hosts.sh (its own addresses, host
# name and scratch), the controller on this machine, the login host, at 10.77.0.1
HOSTS=${UNIDASK_SLURM_HOSTS:-0}
export UNIDASK_HOSTS_DIR=${UNIDASK_HOSTS_DIR:-$BASE/hosts}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "start.sh: SLURM is not installed (cluster/install.sh installs it, as root)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "start.sh: starting slurmd and munged needs root" >&2
    exit 2
fi

"$HERE/stop.sh" >/dev/null 2>&1 || true
if [ "$HOSTS" = 1 ]; then "$HERE/hosts.sh" start "$NODES" >/dev/null; fi
rm -rf "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log" "$BASE/nodes"
mkdir -p "$BASE"/{state,spool,run,log,nodes}
chmod 1777 "$BASE/nodes"
HOST=$(hostname -s)
LAST=$((17000 + NODES))
CTLD_ADDR=127.0.0.1
CTLD_PORT=16817
TIMEOUTS=
NODE_LINES="NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$LAST] CPUs=$CPUS RealMemory=64000 State=UNKNOWN"
SCRATCH='$(dirname "$0")/nodes/$SLURMD_NODENAME'
if [ "$HOSTS" = 1 ]; then
    CTLD_ADDR=10.77.0.1
    CTLD_PORT=16818   # beside a single-stack cluster of this script, if one runs
    NODE_LINES=$(for k in $(seq 1 "$NODES"); do
        echo "NodeName=node$k NodeHostname=node$k NodeAddr=10.77.0.$((10 + k)) Port=17001 CPUs=$CPUS RealMemory=64000 State=UNKNOWN"
    done)
    SCRATCH="$UNIDASK_HOSTS_DIR/scratch"   # each node's own tmpfs there
    # a node that stops answering is DOWN after 30 s (SLURM's default: 300), so the host-fault
    # tests see what a cluster does with a lost node within minutes
    TIMEOUTS="SlurmdTimeout=30"
fi

cat >"$BASE/slurm.conf" <<CONF
ClusterName=unidask
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (SLURM's default: 120): short here, so
# that a test of a job that requeues itself before its walltime does not wait minutes each time
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$BASE/taskprolog.sh
Epilog=$BASE/epilog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=0
MinJobAge=5
KillWait=5
InactiveLimit=0
$TIMEOUTS
SlurmdParameters=config_overrides
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
$NODE_LINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
cat >"$BASE/taskprolog.sh" <<SH
#!/bin/sh
# each task of a job sees this node's scratch dir of the job as \$TMPDIR
d="$SCRATCH/job\$SLURM_JOB_ID"
mkdir -p "\$d" && echo "export TMPDIR=\$d"
SH
cat >"$BASE/epilog.sh" <<SH
#!/bin/sh
# the job ended: its scratch dir on this node is gone, as on a real cluster
rm -rf "$SCRATCH/job\$SLURM_JOB_ID"
SH
chmod 755 "$BASE/taskprolog.sh" "$BASE/epilog.sh"
export SLURM_CONF=$BASE/slurm.conf

# munge: start it only when no working munged answers (a second one cannot take its lock)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$BASE/run/munged.pid"
fi

# UNIDASK_SLURM_SHARED=DIR (with UNIDASK_SLURM_HOSTS=1): DIR is the cluster's shared storage, a
# network filesystem (cluster/netfs.sh) that the login host and every node mount over the
# management network, each through its own sshfs: a node cut off loses it too, as on a cluster.
# No directory cache (sshfs keeps listings 20 s): a test that lists from the login host what the
# nodes just staged must see it (NFS's attribute cache has the same effect: README, Tested against)
SHARED=${UNIDASK_SLURM_SHARED:-}
if [ "$HOSTS" = 1 ] && [ -n "$SHARED" ]; then
    export UNIDASK_NETFS_DIR=$BASE/netfs UNIDASK_NETFS_PORT=16823 UNIDASK_NETFS_LISTEN=10.77.0.1 \
        UNIDASK_NETFS_OPTIONS=dir_cache=no
    "$HERE/netfs.sh" start "$SHARED"
    echo "$SHARED" >"$BASE/run/shared"
    for k in $(seq 1 "$NODES"); do "$HERE/hosts.sh" exec "$k" "$HERE/netfs.sh" mount "$SHARED" 10.77.0.1; done
fi

slurmctld -f "$SLURM_CONF"
for k in $(seq 1 "$NODES"); do
    if [ "$HOSTS" = 1 ]; then
        "$HERE/hosts.sh" exec "$k" slurmd -f "$SLURM_CONF" -N "node$k"
    else
        slurmd -f "$SLURM_CONF" -N "node$k"
    fi
done

for _ in $(seq 1 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$NODES" ] && break
    sleep 0.5
done
if [ "$idle" -lt "$NODES" ]; then
    echo "start.sh: only $idle of $NODES nodes came up; logs in $BASE/log" >&2
    sinfo >&2 || true
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF"
