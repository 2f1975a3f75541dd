"""The chaos instances' ports stay out of the kernel's range for outgoing connections.

A port in net.ipv4.ip_local_port_range can be the local port of any client connection on the
machine (or of its TIME_WAIT), and the campaign's service restarts then fail to bind it: the
test_chaos CI flake of issue 13 (base 30000: 39092 and 35432, even ports, which connect()
hands out first).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.chaos.services import Instance
from tests.integration.test_chaos import DEFAULT_PORT_BASE

pytestmark = pytest.mark.unit

LINUX_DEFAULT_LOW = 32768


@pytest.mark.parametrize("base", [20_000, int(DEFAULT_PORT_BASE)], ids=["make chaos", "test_chaos"])
def test_default_instances_bind_below_the_ephemeral_range(base: int) -> None:
    ports = Instance("x", base).ports
    assert max(ports.values()) + 1 < LINUX_DEFAULT_LOW, ports  # +1: the failover standby


def test_a_base_inside_the_range_is_named() -> None:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(x) for x in text.split())
    except OSError:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range")
    inst = Instance("x", 30_000)
    expected = sorted(p for p in inst.ports.values() if low <= p <= high)
    assert inst.ephemeral_ports() == expected
    if (low, high) == (32768, 60999):
        assert expected == [35432, 36379, 39092, 39093]
