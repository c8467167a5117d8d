#!/usr/bin/env bash
# A real network filesystem on this one machine, standing in for a cluster's shared storage: sshfs
# (SFTP over TCP, through FUSE) served by an sshd of its own on 127.0.0.1. Live shards must refuse
# it; staging, merging and reading must work on it.
#
#   cluster/netfs.sh start MOUNTPOINT    mounts $UNIDASK_NETFS_DIR/export at MOUNTPOINT
#   cluster/netfs.sh mount MOUNTPOINT HOST   mounts the same export from the sshd at HOST (another
#                                        host: a node of cluster/hosts.sh, through hosts.sh exec)
#   cluster/netfs.sh stop MOUNTPOINT     unmounts it and ends the sshd this started
#
# The sshd listens on 127.0.0.1 and on $UNIDASK_NETFS_LISTEN (an address the other hosts reach).
# Everything else lives under $UNIDASK_NETFS_DIR (default /var/tmp/unidask-netfs); each start
# begins with an empty export. Exits 2 where it cannot run: not root (to run sshd), no /dev/fuse,
# or sshfs not installed (cluster/install.sh).
set -euo pipefail
ACTION=${1:?usage: netfs.sh start|stop|mount MOUNTPOINT [HOST]}
MNT=${2:?usage: netfs.sh start|stop|mount MOUNTPOINT [HOST]}
BASE=${UNIDASK_NETFS_DIR:-/var/tmp/unidask-netfs}
PORT=${UNIDASK_NETFS_PORT:-16822}

LISTEN=${UNIDASK_NETFS_LISTEN:-}
OPTIONS=${UNIDASK_NETFS_OPTIONS:-}   # more sshfs -o options, e.g. dir_cache=no

mount_from() {   # mount_from HOST: the export at $MNT, over SFTP from the sshd at HOST
    mkdir -p "$MNT"
    sshfs -p "$PORT" -o IdentityFile="$BASE/client_key",BatchMode=yes,StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null,LogLevel=ERROR${OPTIONS:+,$OPTIONS} "root@$1:$BASE/export" "$MNT"
    grep -q " $MNT fuse.sshfs " /proc/mounts
}

stop() {
    if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    if [ -f "$BASE/sshd.pid" ]; then kill "$(cat "$BASE/sshd.pid")" 2>/dev/null || true; rm -f "$BASE/sshd.pid"; fi
}

if [ "$ACTION" = stop ]; then stop; exit 0; fi
if [ "$ACTION" = mount ]; then mount_from "${3:?usage: netfs.sh mount MOUNTPOINT HOST}"; exit 0; fi
if [ "$(id -u)" != 0 ] || [ ! -e /dev/fuse ]; then
    echo "netfs.sh: needs root (for sshd) and /dev/fuse" >&2
    exit 2
fi
if ! command -v sshfs >/dev/null || [ ! -x /usr/sbin/sshd ]; then
    echo "netfs.sh: sshfs or sshd is not installed (cluster/install.sh installs them, as root)" >&2
    exit 2
fi

stop
rm -rf "$BASE/export"
mkdir -p "$BASE/export" "$MNT" /run/sshd
[ -f "$BASE/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$BASE/host_key"
[ -f "$BASE/client_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$BASE/client_key"
cp "$BASE/client_key.pub" "$BASE/authorized_keys"
cat >"$BASE/sshd_config" <<CONF
ListenAddress 127.0.0.1
${LISTEN:+ListenAddress $LISTEN}
Port $PORT
HostKey $BASE/host_key
AuthorizedKeysFile $BASE/authorized_keys
PidFile $BASE/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
CONF
/usr/sbin/sshd -f "$BASE/sshd_config"
for _ in $(seq 50); do [ -f "$BASE/sshd.pid" ] && break; sleep 0.1; done
mount_from 127.0.0.1
