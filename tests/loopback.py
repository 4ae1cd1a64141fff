"""What the tests count as listening on loopback only."""

from __future__ import annotations

import ipaddress


def on_loopback(ip: str) -> bool:
    """Whether `ip` is loopback (gRPC listens on the IPv4-mapped IPv6 ``::ffff:127.0.0.1``)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
