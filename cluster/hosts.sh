#!/usr/bin/env bash
# Separate hosts on this one machine, for a SLURM cluster whose nodes are really apart (issue 18):
# each node is a network namespace with its own addresses on two bridged networks (management:
# eth0, 10.77.0.0/24; data: data0, 10.78.0.0/24), no default route, its own host name (a UTS
# namespace) and its own node-local scratch (a tmpfs in a mount namespace of its own, at
# $BASE/scratch, which the other nodes and this host see empty). This machine's own namespace is
# the login host: 10.77.0.1 and 10.78.0.1 on the bridges.
#
#   cluster/hosts.sh start [NODES=3]    bring the hosts up (a second start starts fresh)
#   cluster/hosts.sh exec K CMD...      run CMD on node K (its network, host name and mounts)
#   cluster/hosts.sh stop               tear down every namespace, link, bridge and mount it made
#
# Needs root; exits 2 where it cannot run.
set -euo pipefail
ACTION=${1:?usage: hosts.sh start [NODES] | exec K CMD... | stop}
BASE=${UNIDASK_HOSTS_DIR:-/var/tmp/unidask-hosts}
PREFIX=ud            # names of namespaces, links and bridges: ud-node1, udm1, ud-mgmt...

node_pid() { cat "$BASE/node$1.pid" 2>/dev/null; }

stop() {
    for pidfile in "$BASE"/node*.pid; do
        [ -e "$pidfile" ] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true   # the holder: its mounts go with it
        rm -f "$pidfile"
    done
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-node" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    if mountpoint -q "$BASE/cgroup" 2>/dev/null; then umount -R "$BASE/cgroup" 2>/dev/null || umount -l "$BASE/cgroup" || true; fi
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
                  | grep -E "^(${PREFIX}m|${PREFIX}d)[0-9]+$|^$PREFIX-(mgmt|data)$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
}

if [ "$ACTION" = stop ]; then stop; exit 0; fi
if [ "$ACTION" = exec ]; then
    K=${2:?usage: hosts.sh exec K CMD...}
    shift 2
    PID=$(node_pid "$K") || { echo "hosts.sh: node$K is not up" >&2; exit 2; }
    exec nsenter -t "$PID" --net --uts --mount -- "$@"
fi
[ "$ACTION" = start ] || { echo "hosts.sh: unknown action $ACTION" >&2; exit 2; }
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then
    echo "hosts.sh: needs root, iproute2 and util-linux (network, UTS and mount namespaces)" >&2
    exit 2
fi
NODES=${2:-3}
stop
mkdir -p "$BASE/scratch" "$BASE/cgroup"
# this host's cgroups, where the nodes' fresh /sys can bind them from
if [ -d /sys/fs/cgroup ] && ! mountpoint -q "$BASE/cgroup"; then mount --rbind /sys/fs/cgroup "$BASE/cgroup" || true; fi
for net in mgmt data; do
    ip link add "$PREFIX-$net" type bridge
    ip link set "$PREFIX-$net" up
done
ip addr add 10.77.0.1/24 dev "$PREFIX-mgmt"
ip addr add 10.78.0.1/24 dev "$PREFIX-data"
for k in $(seq 1 "$NODES"); do
    ns=$PREFIX-node$k
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    for net in m d; do
        inside=$([ $net = m ] && echo eth0 || echo data0)
        ip link add "$PREFIX$net$k" type veth peer name "$inside" netns "$ns"
        ip link set "$PREFIX$net$k" master "$PREFIX-$([ $net = m ] && echo mgmt || echo data)" up
        ip -n "$ns" addr add "10.7$([ $net = m ] && echo 7 || echo 8).0.$((10 + k))/24" dev "$inside"
        ip -n "$ns" link set "$inside" up
    done
    # the node's host name and its private scratch, held by a process whose namespaces later
    # commands join (hosts.sh exec); no default route: a compute node has no way out
    ip netns exec "$ns" unshare --uts --mount --propagation private sh -c "
        hostname node$k
        mount -t tmpfs -o size=2g,mode=1777 tmpfs '$BASE/scratch'
        # ip netns exec gave the node a fresh /sys without cgroups; slurmd wants this host's
        mount --rbind '$BASE/cgroup' /sys/fs/cgroup 2>/dev/null || true
        echo \$\$ > '$BASE/node$k.pid'
        exec sleep infinity" </dev/null >/dev/null 2>&1 &
done
for k in $(seq 1 "$NODES"); do
    for _ in $(seq 1 100); do [ -s "$BASE/node$k.pid" ] && break; sleep 0.05; done
    [ -s "$BASE/node$k.pid" ] || { echo "hosts.sh: node$k did not come up" >&2; exit 1; }
    # the holder has mounted its scratch once its mount table shows it
    for _ in $(seq 1 100); do grep -q " $BASE/scratch tmpfs" "/proc/$(node_pid "$k")/mounts" && break; sleep 0.05; done
done
echo "hosts.sh: $NODES node(s) up: node1..node$NODES, management 10.77.0.11.., data 10.78.0.11.. (data0)"
