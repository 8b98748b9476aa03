"""The GDB remote serial protocol, client side: packets over a socket, nothing more.

Framing (``$data#checksum``), acknowledgements (until ``QStartNoAckMode``), binary
escapes and run-length encoding in replies, and the asynchronous interrupt byte.  What
the packets mean lives in :mod:`ubp_core.gdbremote.target`.
"""

from __future__ import annotations

import re
import socket
import time
from collections import deque

from ..errors import TargetError

ESCAPE = 0x7D
INTERRUPT = b"\x03"
#: a reply longer than this is refused (a stub gone wrong would fill memory until timeout)
MAX_PACKET = 16 << 20


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


# a stop reply naming its thread: no other reply starts this way (memory and register
# replies are hex, and qXfer replies start with l or m)
_STOP_REPLY = re.compile(rb"^T[0-9a-fA-F]{2}.*thread:")


def _is_stop_reply(reply: bytes) -> bool:
    return bool(_STOP_REPLY.match(reply))


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
        self._ack_owed = False
        self._last: bytes | None = None
        self._buf = bytearray()
        self.log: list[tuple[str, bytes]] | None = None  # set to a list to record traffic
        #: stop replies that came while another reply was awaited (None: not expected)
        self.async_stops: deque[bytes] | None = None

    def close(self) -> None:
        try:
            self.flush_ack()
        except TargetError:
            pass
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
        """Send one packet.

        Acknowledgements are not waited for: a ``-`` (resend) is noticed when the reply
        is read.  Our own ``+`` for the previous reply rides along with this packet,
        which saves a system call per packet on both sides (a stub that waits for the
        ``+`` before it reads on gets it in the same read).
        """
        if self.log is not None:
            self.log.append(("->", data))
        frame = b"$" + data + b"#" + checksum(data)
        self._last = frame
        self._sendall(self._take_ack() + frame)

    def _take_ack(self) -> bytes:
        if self._ack_owed:
            self._ack_owed = False
            return b"+"
        return b""

    def flush_ack(self) -> None:
        """Send a pending ``+`` now (before going quiet: some stubs wait for it)."""
        ack = self._take_ack()
        if ack:
            self._sendall(ack)

    def receive(self, timeout: float | None = -1.0) -> bytes:
        """The next packet's body; ``timeout`` None waits forever, -1 the default."""
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        resends = 0
        while True:
            start = self._buf.find(b"$")
            noise = self._buf[:start] if start >= 0 else self._buf
            if b"-" in noise and self._last is not None:  # the stub asks for a resend
                resends += 1
                if resends > 5:
                    raise StubError("the GDB stub kept rejecting a packet")
                self._sendall(self._last)
            if start < 0:
                self._buf.clear()
                self._fill(deadline)
                continue
            del self._buf[:start]
            end = self._buf.find(b"#")
            if end < 0 and len(self._buf) > MAX_PACKET:
                raise StubError(f"the GDB stub sent a packet larger than {MAX_PACKET >> 20} MiB")
            if end < 0 or len(self._buf) < end + 3:
                self._fill(deadline)
                continue
            body = bytes(self._buf[1:end])
            sent = bytes(self._buf[end + 1:end + 3])
            del self._buf[:end + 3]
            if self.ack:
                if sent.lower() != checksum(body):
                    self._sendall(self._take_ack() + b"-")
                    continue
                self._ack_owed = True
            body = _unescape(body)
            if self.log is not None:
                self.log.append(("<-", body))
            return body

    def request(self, data: bytes, timeout: float | None = -1.0) -> bytes:
        """Send a packet and return the reply, skipping console output (``O...``).

        With :attr:`async_stops` set, a stop reply that arrives in place of the reply
        is kept there: stubs that do not stop every thread at a stop (qemu-user before
        9.0) send another thread's stop whenever that thread traps."""
        self.send(data)
        while True:
            reply = self.receive(timeout)
            if reply.startswith(b"O") and reply != b"OK":
                continue  # console output of the program
            if self.async_stops is not None and _is_stop_reply(reply):
                self.async_stops.append(reply)
                continue
            return reply

    def interrupt(self) -> None:
        """The out-of-band stop request (Ctrl-C)."""
        self._sendall(self._take_ack() + INTERRUPT)
