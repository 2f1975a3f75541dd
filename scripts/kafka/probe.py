"""Is a Kafka broker really serving?  Standard library only, so it runs before any venv exists.

Ready means: a Metadata request (v4) lists at least one broker -- in KRaft mode only once the
broker is unfenced and serving -- and FindCoordinator (v1) finds a group coordinator and a
transaction coordinator.  The first FindCoordinator of each kind makes the broker create
__consumer_offsets / __transaction_state, so clients never see "coordinator not available"
on a fresh broker.  Exit status 0 = ready, 1 = not (yet).

    python3 scripts/kafka/probe.py 127.0.0.1 19092
"""

from __future__ import annotations

import socket
import struct
import sys

METADATA = 3  # api key; version 4 is non-flexible and understood by Kafka 1.0 .. 4.x
FIND_COORDINATOR = 10  # api key; version 1 (non-flexible)
GROUP, TRANSACTION = 0, 1  # FindCoordinator key types


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


class Connection:
    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.correlation_id = 0

    def close(self) -> None:
        self.sock.close()

    def call(self, api_key: int, version: int, body: bytes) -> bytes:
        self.correlation_id += 1
        header = struct.pack(">hhi", api_key, version, self.correlation_id)
        payload = header + _string("services-probe") + body
        self.sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", self._read(4))
        response = self._read(size)
        (correlation_id,) = struct.unpack(">i", response[:4])
        if correlation_id != self.correlation_id:
            raise ValueError(f"unexpected correlation id {correlation_id}")
        return response[4:]

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed by broker")
            data += chunk
        return data


def broker_count(conn: Connection) -> int:
    # topics: null array (-1) = all topics; allow_auto_topic_creation: false
    response = conn.call(METADATA, 4, struct.pack(">i?", -1, False))
    _throttle_ms, brokers = struct.unpack(">ii", response[:8])
    return int(brokers)


def coordinator_error(conn: Connection, key: str, key_type: int) -> int:
    response = conn.call(FIND_COORDINATOR, 1, _string(key) + struct.pack(">b", key_type))
    _throttle_ms, error_code = struct.unpack(">ih", response[:6])
    return int(error_code)


def ready(host: str, port: int) -> bool:
    conn = Connection(host, port)
    try:
        return (
            broker_count(conn) > 0
            and coordinator_error(conn, "services-probe", GROUP) == 0
            and coordinator_error(conn, "services-probe", TRANSACTION) == 0
        )
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    host = argv[1] if len(argv) > 1 else "127.0.0.1"
    port = int(argv[2]) if len(argv) > 2 else 19092
    try:
        return 0 if ready(host, port) else 1
    except (OSError, ValueError, struct.error):
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
