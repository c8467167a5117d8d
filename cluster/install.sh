#!/usr/bin/env bash
# Install, as root, the Debian packages that the full test suite needs beside pip's: SLURM and munge
# (cluster/start.sh), sshd and sshfs (cluster/netfs.sh), nftables (cluster/hosts.sh), chromium
# (the browser tests). CI runs it before the tests; a contributor without root skips those tests,
# each with its reason.
#
#   cluster/install.sh
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: installing Debian packages needs root" >&2
    exit 2
fi
need=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || need+=(slurmctld slurmd slurm-client munge)
{ command -v sshfs >/dev/null && [ -x /usr/sbin/sshd ]; } || need+=(openssh-server openssh-client sshfs)
command -v chromium >/dev/null || need+=(chromium)
command -v nft >/dev/null || need+=(nftables)   # hosts.sh partition: a cut between two nodes
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
