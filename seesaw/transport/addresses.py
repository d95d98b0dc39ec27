"""Which address of this host a peer can reach: the interface toward that peer, unless the user
says otherwise (`--advertise-address`, or GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)."""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Mapping, MutableMapping

_SIOCGIFADDR = 0x8915


class JoinError(RuntimeError):
    """A worker could not join its peers in time; the message says what to try."""
_WILDCARDS = ("0.0.0.0", "*", "")


def routable_ip(toward: str) -> str:
    """This host's address on the interface that routes toward `toward` (127.0.0.1 if none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((toward, 9))  # UDP: picks a route, sends nothing
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def interface_ip(name: str) -> str | None:
    """The IPv4 address of network interface `name` (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            request = struct.pack("256s", name.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
        except OSError:
            return None


def interface_of(ip: str) -> str | None:
    """The name of the interface that holds `ip` (None if no interface of this host does)."""
    return next((name for _, name in socket.if_nameindex() if interface_ip(name) == ip), None)


def host_of(address: str) -> str:
    """The host part of tcp://HOST:PORT (or of HOST:PORT)."""
    return address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


def advertise_ip(toward: str, override: str | None, environ: Mapping[str, str]) -> str:
    """The address of this host to give a peer at `toward`: `override`; else the address of
    GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME) when set; else the interface that routes to the peer."""
    if override:
        return override
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        interface = environ.get(name, "").split(",")[0]
        if interface and (ip := interface_ip(interface)) is not None:
            return ip
    return routable_ip(toward)


def pin_interfaces(ip: str, environ: MutableMapping[str, str]) -> None:
    """Make gloo and NCCL use the interface that holds `ip` (unless the user chose one): left
    alone they pick by hostname, which on many hosts resolves to a loopback address."""
    interface = interface_of(ip)
    if interface is not None:
        environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        environ.setdefault("NCCL_SOCKET_IFNAME", interface)


def reachable(address: str, ip: str) -> str:
    """`address` with a wildcard host (0.0.0.0, *) replaced by `ip`, the one peers should use."""
    if not address.startswith("tcp://") or host_of(address) not in _WILDCARDS:
        return address
    return f"tcp://{ip}:{address.rsplit(':', 1)[1]}"
