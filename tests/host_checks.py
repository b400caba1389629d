"""What this host offers that some tests need: skip markers with the reason, written once."""

from __future__ import annotations

import socket

import pytest


def nginx_available() -> bool:
    from detserve.ops.nginx import nginx_binary

    try:
        nginx_binary()
        return True
    except Exception:
        return False


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_nginx = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (apt-get install nginx-light)")
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
