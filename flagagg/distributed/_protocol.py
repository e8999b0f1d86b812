"""The wire format between the parameter server and its workers.

Every connection is mutual TLS 1.3 with the run's own certificates
(:func:`flagagg.distributed.issue_certificates`): TLS encrypts and authenticates every
byte, and the certificates say who is at each end. Inside it, a message is a
fixed 36-byte header and ``nbytes`` of payload. Tensors travel as their raw
little-endian bytes (the header names the dtype), control messages as small
flat JSON objects (at most ``MAX_JSON_BYTES``, nesting depth at most
``MAX_JSON_DEPTH``, checked before the parser sees them); nothing is ever
unpickled. A header is checked (magic, version, kind, dtype, size against
the receiver's limit) before a byte of its payload is read.

The server reads every connection with :class:`FrameProtocol`, which has the
socket (or the TLS layer's decryption) write each message straight into its
own buffer: first the HELLO alone (nothing larger is accepted, and reading
pauses once it is in), then, once the worker is in, its gradients; workers
use :func:`send_frame` and :func:`recv_frame` on blocking sockets.

Header (little-endian)::

    magic  4s   b"FLAG"
    kind   B    HELLO, WELCOME, REJECT, PARAMS, GRAD, STOP
    dtype  B    0 for JSON, else a code of DTYPES
    version H   PROTOCOL_VERSION
    worker I    the worker a GRAD comes from
    round  Q    the training round a PARAMS or GRAD belongs to
    nbytes Q    payload size
    seconds d   GRAD: the worker's compute time for the round
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DTYPES",
    "HEADER",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameProtocol",
    "Kind",
    "ProtocolError",
    "check_header",
    "decode_json",
    "encode",
    "encode_json",
    "encode_tensor",
    "recv_frame",
    "send_frame",
]

MAGIC = b"FLAG"
# 4: inside mutual TLS, no frame tags of flagagg's own (3: HMAC/Poly1305 tags)
PROTOCOL_VERSION = 4
HEADER = struct.Struct("<4sBBHIQQd")
# control messages are small flat objects; anything larger is a broken or hostile peer
MAX_JSON_BYTES = 4096
MAX_JSON_DEPTH = 2


class Kind:
    """Frame kinds."""

    HELLO = 1      # worker -> server: who I am (JSON)
    WELCOME = 2    # server -> worker: accepted (JSON)
    REJECT = 3     # server -> worker: refused, with the reason (JSON)
    PARAMS = 4     # server -> worker: flat parameters of a round (tensor)
    GRAD = 5       # worker -> server: flat gradient of a round (tensor)
    STOP = 6       # server -> worker: training is over (JSON)

    NAMES = {1: "HELLO", 2: "WELCOME", 3: "REJECT", 4: "PARAMS", 5: "GRAD", 6: "STOP"}
    TENSOR = (PARAMS, GRAD)


# dtype code <-> NumPy dtype of a tensor payload; 0 means JSON
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2")}
_CODES = {dt: code for code, dt in DTYPES.items()}


class ProtocolError(Exception):
    """A peer sent something that is not a valid message; its connection is closed."""


def _depth(data):
    """The deepest nesting of JSON arrays and objects in ``data`` (bytes), strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for c in data:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:    # backslash
                escaped = True
            elif c == 0x22:    # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def decode_json(payload, what="control message"):
    """A control message's JSON object, refusing anything deep, large or not an object.

    Raises
    ------
    ProtocolError
        If the payload is over ``MAX_JSON_BYTES``, nests deeper than
        ``MAX_JSON_DEPTH``, is not UTF-8 JSON, or not an object.
    """
    data = bytes(payload)
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what} of {len(data)} bytes is over the {MAX_JSON_BYTES}-byte limit")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {str(exc)[:100]}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Frame:
    """One received message.

    Attributes
    ----------
    kind : int
        One of :class:`Kind`.
    dtype : int
        Payload dtype code (0 for JSON).
    worker : int
        Worker index in the header.
    round : int
        Round in the header.
    seconds : float
        Compute seconds reported with a gradient.
    payload : bytes-like
        The payload, complete.
    """

    kind: int
    dtype: int
    worker: int
    round: int
    seconds: float
    payload: object

    def json(self):
        """The payload of a control message, decoded (see :func:`decode_json`)."""
        return decode_json(self.payload, f"{Kind.NAMES.get(self.kind)} payload")

    def array(self):
        """The payload of a tensor message as a 1-D NumPy array (sharing its memory)."""
        dt = DTYPES.get(self.dtype)
        if dt is None:
            raise ProtocolError(f"unknown dtype code {self.dtype}")
        if len(self.payload) % dt.itemsize:
            raise ProtocolError(
                f"payload of {len(self.payload)} bytes is not a whole number of {dt} values"
            )
        return np.frombuffer(self.payload, dtype=dt)


def encode(kind, payload=b"", *, dtype=0, worker=0, round=0, seconds=0.0):
    """Header and payload of a message: a (bytes, memoryview) pair; the payload is not copied."""
    view = memoryview(payload).cast("B")
    head = HEADER.pack(MAGIC, kind, dtype, PROTOCOL_VERSION, int(worker), int(round),
                       view.nbytes, float(seconds))
    return head, view


def encode_json(kind, obj, **header):
    """A control message holding ``obj`` as JSON; see :func:`encode`."""
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode("utf-8"), **header)


def encode_tensor(kind, array, **header):
    """A tensor message holding a 1-D NumPy array's raw bytes; see :func:`encode`."""
    array = np.ascontiguousarray(array)
    code = _CODES.get(array.dtype.newbyteorder("<"))
    if code is None:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}: use float32")
    return encode(kind, array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1),
                  dtype=code, **header)


def check_header(raw, max_tensor_bytes, kinds):
    """Unpack and check a header before any of its payload is read.

    Returns
    -------
    head : tuple
        (magic, kind, dtype, version, worker, round, nbytes, seconds).

    Raises
    ------
    ProtocolError
        On a bad magic number, version, kind, dtype, or a size over the limit.
    """
    head = HEADER.unpack(raw)
    magic, kind, dtype, version, _, _, nbytes, _ = head
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a flagagg peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
                            "run the same flagagg version on every node")
    if kind not in kinds:
        raise ProtocolError(f"unexpected message kind {Kind.NAMES.get(kind, kind)}")
    limit = max_tensor_bytes if kind in Kind.TENSOR else MAX_JSON_BYTES
    if nbytes > limit:
        raise ProtocolError(f"{Kind.NAMES[kind]} message of {nbytes} bytes is over the "
                            f"{limit}-byte limit")
    if (kind in Kind.TENSOR) != (dtype in DTYPES):
        raise ProtocolError(f"dtype code {dtype} does not fit a {Kind.NAMES[kind]} message")
    return head


def _frame(head, payload):
    _, kind, dtype, _, worker, rnd, _, seconds = head
    return Frame(kind, dtype, worker, rnd, seconds, payload)


class FrameProtocol(asyncio.BufferedProtocol):
    """A connection's messages, each read straight into its own buffer.

    asyncio's streams copy every chunk they receive into the reader's buffer,
    then copy again to cut a message out of it (and, under TLS, join the
    decrypted records first). This protocol instead hands the transport the
    free part of the message being read (its 36-byte header, then a payload
    buffer allocated once the header has been checked), so that the socket,
    or under TLS the decryption, writes each byte once, where it stays. It
    also carries the connection's write flow control (:meth:`drain`).

    Parameters
    ----------
    max_tensor_bytes : int
        The largest tensor payload accepted; a header over it is a
        :class:`ProtocolError` (see :func:`check_header`).
    kinds : set of int
        The message kinds accepted.
    on_frame : callable
        Called with each complete :class:`Frame` (on the loop's thread); a
        tensor payload is a writable ``bytearray``.
    on_header : callable, optional
        Called with each checked header tuple (see :func:`check_header`)
        before its payload buffer is allocated; a :class:`ProtocolError` it
        raises ends the connection, so that a message the owner would refuse
        costs no memory.

    Attributes
    ----------
    closed : asyncio.Future
        Done, with why (a str), once the connection has ended or broke the
        protocol; the owner then aborts the transport.
    reason : str or None
        The same why, None while the connection is up.
    """

    def __init__(self, max_tensor_bytes, kinds, on_frame, on_header=None):
        self._limit = max_tensor_bytes
        self._kinds = kinds
        self._on_frame = on_frame
        self._on_header = on_header
        self._paused = False     # reading paused by the owner (see pause)
        self._head = bytearray(HEADER.size)
        self._view = memoryview(self._head)
        self._got = 0
        self._header = None      # the checked header of the payload being read
        self._payload = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.transport = None
        self.reason = None
        self.closed = asyncio.get_running_loop().create_future()

    def expect(self, max_tensor_bytes, kinds, on_frame, on_header=None):
        """Read the next messages under new terms (the server's switch after a HELLO).

        Called between messages (after ``on_frame``, typically while reading
        is paused), so no header is half-checked under the old terms.
        """
        self._limit = max_tensor_bytes
        self._kinds = kinds
        self._on_frame = on_frame
        self._on_header = on_header

    def pause(self):
        """Stop reading from the peer (its sends then wait in TCP) until :meth:`resume`."""
        if not self._paused and self.reason is None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self):
        """Read from the peer again after :meth:`pause`."""
        if self._paused and self.reason is None:
            self._paused = False
            self.transport.resume_reading()

    def fail(self, why):
        """End the connection for ``why`` (see ``closed``); the owner aborts the transport."""
        self._end(why)

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.reason is not None:
            # broken: the transport is being aborted, whatever still comes is dropped
            return memoryview(self._head)
        return self._view[self._got:]

    def buffer_updated(self, nbytes):
        if self.reason is not None:
            return
        self._got += nbytes
        if self._got < len(self._view):
            return
        try:
            if self._header is None:
                self._header = check_header(bytes(self._head), self._limit, self._kinds)
                if self._on_header is not None:
                    self._on_header(self._header)
                size = self._header[6]
                if size:
                    # writable, as torch wants its tensors' memory
                    self._payload = bytearray(size)
                    self._view, self._got = memoryview(self._payload), 0
                    return
                self._payload = bytearray()
            frame = _frame(self._header, self._payload)
            self._header = self._payload = None
            self._view, self._got = memoryview(self._head), 0
            self._on_frame(frame)
        except ProtocolError as exc:
            self._end(f"protocol error: {exc}")

    def _end(self, why):
        if self.reason is None:
            self.reason = why
        if not self.closed.done():
            self.closed.set_result(why)
        self._writable.set()  # a sender waiting in drain() learns of it there

    def eof_received(self):
        self._end("connection closed")
        return False

    def connection_lost(self, exc):
        self._end("connection closed" if exc is None else f"connection error: {exc}")

    def pause_writing(self):
        self._writable.clear()

    def resume_writing(self):
        self._writable.set()

    def write(self, head, payload):
        """Queue a message from :func:`encode` (header and payload, neither copied here)."""
        self.transport.write(head)
        if len(payload):
            self.transport.write(payload)

    async def drain(self):
        """Wait until the transport wants more; ConnectionError once the connection ended."""
        await self._writable.wait()
        if self.reason is not None:
            raise ConnectionError(self.reason)


def send_frame(sock, parts):
    """Send a message from :func:`encode` on a blocking socket."""
    head, view = parts
    if view.nbytes > 1 << 16:
        sock.sendall(head)
        sock.sendall(view)
    else:
        sock.sendall(bytes(head) + bytes(view))


def _recv_into(sock, view, end, timeout):
    got = 0
    while got < view.nbytes:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete message within {timeout:g} s")
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise TimeoutError(f"no complete message within {timeout:g} s") from None
        if not k:
            raise ConnectionError("the connection was closed by the other side")
        got += k


def recv_frame(sock, max_tensor_bytes, kinds, timeout):
    """Receive the next message on a blocking socket, its header checked first.

    Raises
    ------
    ConnectionError
        If the peer closed the connection.
    TimeoutError
        If no complete message came within ``timeout`` seconds.
    ProtocolError
        See :func:`check_header`.
    """
    end = time.monotonic() + timeout
    raw = bytearray(HEADER.size)
    _recv_into(sock, memoryview(raw), end, timeout)
    head = check_header(bytes(raw), max_tensor_bytes, kinds)
    payload = np.empty(head[6], np.uint8) if head[1] in Kind.TENSOR else bytearray(head[6])
    _recv_into(sock, memoryview(payload).cast("B"), end, timeout)
    return _frame(head, payload)
