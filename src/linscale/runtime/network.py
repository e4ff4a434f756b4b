"""Which local address and interface reach a given host: the answer to most multi-node
launch problems (a wrong interface picked by gloo/NCCL, a master address that is not routable).
"""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915


def resolve(host: str) -> str:
    """`host` as an IPv4 address; raises ValueError naming the host when it does not resolve."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(f"cannot resolve the address {host!r} ({e}); check --master-addr / --rdzv-endpoint") from None


def local_ip_toward(host: str) -> str:
    """The local address the kernel would use to reach `host` (no packet is sent)."""
    ip = resolve(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))  # a UDP "connect" only chooses the route
        except OSError as e:
            raise ValueError(f"no route from this node to {host} ({ip}): {e.strerror}") from None
        return s.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each local interface that has one, e.g. {"lo": "127.0.0.1", "eth0": ...}."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # an interface without an IPv4 address
    return out


def interface_for(ip: str) -> str | None:
    """The name of the local interface that holds `ip`."""
    return next((name for name, addr in interface_addresses().items() if addr == ip), None)


def is_local_address(host: str) -> bool:
    """True when `host` is an address of this machine (this network namespace)."""
    try:
        ip = resolve(host)
    except ValueError:
        return False
    if ip.startswith("127."):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False
