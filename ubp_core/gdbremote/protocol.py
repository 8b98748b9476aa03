"""The GDB remote serial protocol, client side: packets over a socket, nothing more.

Framing (``$data#checksum``), acknowledgements (until ``QStartNoAckMode``), binary
escapes and run-length encoding in replies, and the asynchronous interrupt byte.  What
the packets mean lives in :mod:`ubp_core.gdbremote.target`.
"""

from __future__ import annotations

import socket
import time

from ..errors import TargetError

ESCAPE = 0x7D
INTERRUPT = b"\x03"


class StubError(TargetError):
    """The stub answered with an error, or not at all."""


class StubTimeout(TargetError):
    """No complete reply within the time allowed."""


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def escape(data: bytes) -> bytes:
    """Binary data for an ``X`` packet: ``# $ } *`` are sent as ``}`` + (byte ^ 0x20)."""
    out = bytearray()
    for b in data:
        if b in (0x23, 0x24, 0x7D, 0x2A):
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    """Undo binary escapes and run-length encoding in a reply body."""
    if ESCAPE not in data and 0x2A not in data:
        return data
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == ESCAPE and i + 1 < n:
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < n:  # "x*n": repeat x (n - 29) more times
            out += bytes((out[-1],)) * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """Connect to ``HOST:PORT`` or a Unix socket path, retrying until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ":" in address and not address.startswith("/"):
                host, port = address.rsplit(":", 1)
                sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(address)
            return sock
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if time.monotonic() > deadline:
                raise StubError(f"no GDB stub at {address}: {exc}") from None
            time.sleep(0.02)
        except OSError as exc:
            raise StubError(f"cannot reach a GDB stub at {address}: {exc}") from None


class Connection:
    """One socket to a stub; packets out, packets in."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.ack = True
        self._buf = bytearray()
        self.log: list[tuple[str, bytes]] | None = None  # set to a list to record traffic

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ raw io
    def _fill(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StubTimeout("the GDB stub did not answer in time")
            self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise StubTimeout("the GDB stub did not answer in time") from None
        except OSError as exc:
            raise StubError(f"connection to the GDB stub failed: {exc}") from None
        if not chunk:
            raise StubError("the GDB stub closed the connection")
        self._buf += chunk

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise StubError(f"connection to the GDB stub failed: {exc}") from None

    # ------------------------------------------------------------------ packets
    def send(self, data: bytes) -> None:
        """Send one packet (and wait for its ``+`` while acknowledgements are on)."""
        if self.log is not None:
            self.log.append(("->", data))
        frame = b"$" + data + b"#" + checksum(data)
        for _ in range(5):
            self._sendall(frame)
            if not self.ack:
                return
            deadline = time.monotonic() + self.timeout
            while True:
                while not self._buf:
                    self._fill(deadline)
                c = self._buf[0]
                if c in (0x2B, 0x2D):  # + -
                    del self._buf[0]
                    break
                if c == 0x24:  # a reply started without an ack: take it as one
                    return
                del self._buf[0]
            if c == 0x2B:
                return
        raise StubError("the GDB stub kept rejecting a packet")

    def receive(self, timeout: float | None = -1.0) -> bytes:
        """The next packet's body; ``timeout`` None waits forever, -1 the default."""
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            start = self._buf.find(b"$")
            if start >= 0:
                end = self._buf.find(b"#", start)
                if end >= 0 and len(self._buf) >= end + 3:
                    body = bytes(self._buf[start + 1:end])
                    sent = bytes(self._buf[end + 1:end + 3])
                    del self._buf[:end + 3]
                    if self.ack:
                        if sent.lower() != checksum(body):
                            self._sendall(b"-")
                            continue
                        self._sendall(b"+")
                    body = _unescape(body)
                    if self.log is not None:
                        self.log.append(("<-", body))
                    return body
            elif self._buf:
                self._buf.clear()  # stray acks or noise before a packet
            self._fill(deadline)

    def request(self, data: bytes, timeout: float | None = -1.0) -> bytes:
        """Send a packet and return the reply, skipping console output (``O...``)."""
        self.send(data)
        while True:
            reply = self.receive(timeout)
            if reply.startswith(b"O") and reply != b"OK":
                continue  # console output of the program
            return reply

    def interrupt(self) -> None:
        """The out-of-band stop request (Ctrl-C)."""
        self._sendall(INTERRUPT)
