#!/usr/bin/env bash
# Separate hosts on this one machine, for a SLURM cluster whose nodes are really apart (issue 18):
# each node is a network namespace with its own addresses on two bridged networks (management:
# eth0, 10.77.0.0/24; data: data0, 10.78.0.0/24), no default route, its own host name (a UTS
# namespace) and its own node-local scratch (a tmpfs in a mount namespace of its own, at
# $BASE/scratch, which the other nodes and this host see empty). This machine's own namespace is
# the login host: 10.77.0.1 on the bridge ud-mgmt, 10.78.0.1 on the bridge data0.
#
#   cluster/hosts.sh start [NODES=3]    bring the hosts up (a second start starts fresh)
#   cluster/hosts.sh exec K CMD...      run CMD on node K (its network, host name and mounts)
#   cluster/hosts.sh stop               tear down every namespace, link, bridge and mount it made
#
# Faults of a host, for the tests (each undone by the next start or stop):
#   cluster/hosts.sh cut K | mend K     node K's links down (it is off both networks) | up again
#   cluster/hosts.sh crash K            every process of node K killed; its scratch is gone with them
#   cluster/hosts.sh partition J K      nodes J and K cannot reach each other (both still reach the
#                                       rest); `partition` alone heals every partition
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
    nft delete table bridge "${PREFIX}_partition" 2>/dev/null || true
    if mountpoint -q "$BASE/cgroup" 2>/dev/null; then umount -R "$BASE/cgroup" 2>/dev/null || umount -l "$BASE/cgroup" || true; fi
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
                  | grep -E "^(${PREFIX}m|${PREFIX}d)[0-9]+$|^$PREFIX-mgmt$|^data0$" || true); do
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
case $ACTION in
    cut|mend)
        K=${2:?usage: hosts.sh $ACTION K}
        for link in "${PREFIX}m$K" "${PREFIX}d$K"; do ip link set "$link" "$([ "$ACTION" = cut ] && echo down || echo up)"; done
        exit 0 ;;
    crash)
        K=${2:?usage: hosts.sh crash K}
        # the holder too: the node's mount namespace, and its tmpfs scratch, end with it
        ip netns pids "$PREFIX-node$K" | xargs -r kill -9
        rm -f "$BASE/node$K.pid"
        exit 0 ;;
    partition)
        nft delete table bridge "${PREFIX}_partition" 2>/dev/null || true
        [ $# -ge 3 ] || exit 0
        # dropped on the bridges, as a failed switch port between them would: no error, no reply
        nft add table bridge "${PREFIX}_partition"
        nft add chain bridge "${PREFIX}_partition" forward '{ type filter hook forward priority 0; }'
        for net in 77 78; do
            for from_to in "$2 $3" "$3 $2"; do
                read -r a b <<<"$from_to"
                nft add rule bridge "${PREFIX}_partition" forward ip saddr "10.$net.0.$((10 + a))" \
                    ip daddr "10.$net.0.$((10 + b))" drop
            done
        done
        exit 0 ;;
    start) ;;
    *) echo "hosts.sh: unknown action $ACTION" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then
    echo "hosts.sh: needs root, iproute2 and util-linux (network, UTS and mount namespaces)" >&2
    exit 2
fi
NODES=${2:-3}
stop
mkdir -p "$BASE/scratch" "$BASE/cgroup"
# this host's cgroups, where the nodes' fresh /sys can bind them from
if [ -d /sys/fs/cgroup ] && ! mountpoint -q "$BASE/cgroup"; then mount --rbind /sys/fs/cgroup "$BASE/cgroup" || true; fi
# the data network's bridge is this host's data0, as every node's: a cluster's fast network
# (ib0) has one name on the login host and the nodes, and cluster.interface names it for all
for bridge in "$PREFIX-mgmt" data0; do
    ip link add "$bridge" type bridge
    ip link set "$bridge" up
done
ip addr add 10.77.0.1/24 dev "$PREFIX-mgmt"
ip addr add 10.78.0.1/24 dev data0
for k in $(seq 1 "$NODES"); do
    ns=$PREFIX-node$k
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    for net in m d; do
        inside=$([ $net = m ] && echo eth0 || echo data0)
        ip link add "$PREFIX$net$k" type veth peer name "$inside" netns "$ns"
        ip link set "$PREFIX$net$k" master "$([ $net = m ] && echo "$PREFIX-mgmt" || echo data0)" up
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
