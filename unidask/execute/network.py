"""The addresses other hosts reach: this node's (the one its peers and the scheduler reach it by),
a login host's (the one SLURM's nodes reach it from), and where a job's dashboard listens."""

from __future__ import annotations

import contextlib
import socket
import subprocess

from ..core.errors import InputError


def node_address(interface: str | None = None, towards: str | None = None) -> str:
    """An address of this node that the other nodes can reach: ``interface``'s (dask-jobqueue's
    meaning), else the one this node reaches ``towards`` (the scheduler) from, else the one the
    default route leaves by, else (a compute node often has no default route) the first address
    of an interface that is up and not loopback. Dask's own guess falls back to 127.0.0.1 where
    there is no default route: a scheduler or worker there is unreachable."""
    names = [interface] if interface else [name for _, name in socket.if_nameindex() if name != "lo"]
    if not interface:
        for target in filter(None, (towards, "192.0.2.1")):   # TEST-NET-1: any default route
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))   # nothing is sent: the kernel picks the route and its source
                return s.getsockname()[0]
    for name in names:
        if (address := _interface_address(name)) is not None:
            return address
    if interface:
        raise InputError(f"cluster.interface {interface!r}: no IPv4 address on this node "
                         f"({', '.join(n for _, n in socket.if_nameindex())} exist)")
    return "127.0.0.1"


def login_address(interface: str | None = None) -> str:
    """An address of this (login) host that the compute nodes can reach, for a scheduler here
    (``mode = "slurm"``): ``interface``'s, else the one this host reaches SLURM's nodes from (their
    ``NodeAddr``). A login node's default route often leads out to the users, not to the nodes."""
    if interface:
        return node_address(interface)
    try:
        addrs = subprocess.run(["sinfo", "-h", "-N", "-o", "%o"], capture_output=True, text=True,
                               timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        addrs = []
    return node_address(towards=addrs[0] if addrs else None)


def _interface_address(name: str) -> str | None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:   # SIOCGIFADDR
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def dashboard_address(configured: str, host: str) -> str:
    """Where a job's dashboard listens: ``cluster.dashboard_address``, at the scheduler's own
    address where that names no host or a loopback one (the default, right for a local run: on a
    node only the node itself could reach it, and the ssh tunnel could not)."""
    name, _, port = configured.rpartition(":")
    if name in ("", "localhost", "[::1]") or name.startswith("127."):
        return f"{host}:{port}"
    return configured

