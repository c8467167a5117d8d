#!/usr/bin/env bash
# Stop the SLURM that start.sh brought up: cancel its jobs, then end the daemons it started, by the
# process ids it recorded (never by name). Safe to run when nothing is running.
set -uo pipefail
BASE=${UNIDASK_SLURM_DIR:-/var/tmp/unidask-slurm}
export SLURM_CONF=$BASE/slurm.conf

alive() {  # a pid that exists and is not a zombie (PID 1 may reap late)
    [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]
}
pid_of() { [ -r "$BASE/run/$1.pid" ] && cat "$BASE/run/$1.pid"; }

ctld=$(pid_of slurmctld)
if alive "$ctld"; then  # a SLURM client against a dead controller blocks for many seconds
    scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null
    for _ in $(seq 1 40); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi
pids=()
for f in "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid" "$BASE/run/munged.pid"; do
    [ -r "$f" ] || continue
    p=$(cat "$f")
    if alive "$p"; then kill "$p" 2>/dev/null && pids+=("$p"); fi
    rm -f "$f"
done
for p in "${pids[@]}"; do
    for _ in $(seq 1 40); do alive "$p" || break; sleep 0.25; done
    alive "$p" && kill -9 "$p" 2>/dev/null
done
# the separate hosts, if this cluster ran on them (cluster/hosts.sh): their mounts of the shared
# storage end with them; then the login host's and its server
UNIDASK_HOSTS_DIR=${UNIDASK_HOSTS_DIR:-$BASE/hosts} "$(dirname "$0")/hosts.sh" stop >/dev/null 2>&1 || true
if [ -r "$BASE/run/shared" ]; then
    UNIDASK_NETFS_DIR=$BASE/netfs "$(dirname "$0")/netfs.sh" stop "$(cat "$BASE/run/shared")" >/dev/null 2>&1 || true
    rm -f "$BASE/run/shared"
fi
exit 0
