"""Free TCP ports for launchers and tests: `free_port`, `free_ports`.

Shared by the router (`baton router --processes`) and the services and launchers (both import
`protos`; the router never imports `services`). Bind port 0 where you can; these are for a process
that must name a port another process will bind.
"""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now: every probe stays bound until all are picked, so
    the kernel cannot hand one port out twice (picking them one by one, while the processes given the
    earlier ones have not bound them yet, can: `baton up` once gave two workers the same metrics port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probes = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in probes:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in probes]
    finally:
        for sock in probes:
            sock.close()
