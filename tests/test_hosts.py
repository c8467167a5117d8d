"""cluster/hosts.sh: separate hosts on this machine (network, UTS and mount namespaces), the ground
for a SLURM cluster whose nodes are really apart (issue 18). Each node: its own host name, its own
addresses on a management and a data network, no default route, node-local scratch no one else
sees; every node reaches every other, and the login host (this namespace) reaches them all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SYSTEM_PYTHON, wait_for

SCRIPT = str(REPO / "cluster" / "hosts.sh")
BASE = "/var/tmp/unidask-hosts-tests"
NODES = 3
SERVE = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, (peer, _) = s.accept()
    c.sendall(f"{socket.gethostname()} {peer}".encode())
    c.close()
"""
ASK = "import socket, sys; print(socket.create_connection((sys.argv[1], 5555), timeout=5).recv(100).decode())"


def hosts_sh(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120,
                       env={"UNIDASK_HOSTS_DIR": BASE, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert not check or r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def hosts():
    r = hosts_sh("start", NODES, check=False)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    yield
    hosts_sh("stop")


def on(k: int, *cmd) -> str:
    return hosts_sh("exec", k, *cmd).stdout.strip()


def test_each_node_is_a_host_of_its_own(hosts):
    for k in range(1, NODES + 1):
        assert on(k, "hostname") == f"node{k}"
        addresses = on(k, "ip", "-br", "-4", "addr")
        assert f"10.77.0.{10 + k}/24" in addresses and f"10.78.0.{10 + k}/24" in addresses
        assert "eth0" in addresses and "data0" in addresses
        assert "default" not in on(k, "ip", "route")          # no way out, as on a compute node
    scratch = f"{BASE}/scratch"
    on(1, "sh", "-c", f"echo mine > {scratch}/node1-file")
    assert on(1, "ls", scratch) == "node1-file"
    assert on(2, "ls", scratch) == "" and not subprocess.run(["ls", scratch], capture_output=True,
                                                             text=True).stdout.strip()


def test_every_node_reaches_every_other_on_both_networks(hosts):
    server = subprocess.Popen(["bash", SCRIPT, "exec", "2", SYSTEM_PYTHON, "-c", SERVE, "5555", "3"],
                              env={"UNIDASK_HOSTS_DIR": BASE, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert on(1, SYSTEM_PYTHON, "-c", ASK, "10.77.0.12") == "node2 10.77.0.11"   # management
        assert on(3, SYSTEM_PYTHON, "-c", ASK, "10.78.0.12") == "node2 10.78.0.13"   # data
        login = subprocess.run([SYSTEM_PYTHON, "-c", ASK, "10.77.0.12"], capture_output=True, text=True,
                               timeout=30)
        assert login.stdout.strip() == "node2 10.77.0.1"                              # the login host
    finally:
        server.wait(30)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: its /proc entry there and not a zombie's."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_stop_leaves_nothing_and_a_crashed_start_starts_again(hosts):
    hosts_sh("start", 2)                                   # over a running one: starts fresh
    pids = subprocess.run(["sh", "-c", f"cat {BASE}/node*.pid"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-9", pid])                # a crash: holders gone, links left
    wait_for(lambda: not any(alive(int(pid)) for pid in pids), "the killed holders gone", timeout=60)
    hosts_sh("start", NODES)
    assert on(NODES, "hostname") == f"node{NODES}"
    hosts_sh("stop")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert " ud-mgmt" not in links and " udm1" not in links
    assert "ud-node" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    hosts_sh("start", NODES)                               # back up for the module's other tests
