"""The wire format between the parameter server and its workers.

Every message is one frame: a fixed 36-byte header, then ``nbytes`` of
payload. Tensors travel as their raw little-endian bytes (the header names
the dtype), control messages as small JSON objects; nothing is ever
unpickled. The server reads frames with :class:`FrameReader`, which holds a
frame back until all of it has arrived, so a worker that dies mid-message
leaves nothing behind to aggregate, and refuses a header whose size is over
the limit before reading its payload, so a worker cannot make the server
buffer without bound.

This is the ``tcp`` transport's format; the gloo and NCCL transport
(:mod:`flagagg.distributed._collective`) is the default. It exists for
workers that may attack the protocol itself: with gloo (measured with
PyTorch 2.13's build), a message longer than the posted receive buffer
aborts the receiving process (``gloo::EnforceNotMet``, ``std::terminate``),
so a worker that announces one size and sends a longer message can end the
server. Here the server reads each header before its payload, so it refuses
any size over the limit without reading it, and bounds every wait itself.

Header (little-endian)::

    magic  4s   b"FLAG"
    kind   B    HELLO, WELCOME, REJECT, PARAMS, GRAD, STOP
    dtype  B    0 for JSON, else a code of DTYPES
    version H   PROTOCOL_VERSION
    worker I    the worker a GRAD or HELLO comes from
    round  Q    the training round a PARAMS or GRAD belongs to
    nbytes Q    payload size
    seconds d   GRAD: the worker's compute time for the round
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DTYPES",
    "HEADER",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameReader",
    "ProtocolError",
    "Kind",
    "encode",
    "encode_json",
    "encode_tensor",
    "recv_frame",
    "send_frame",
]

MAGIC = b"FLAG"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHIQQd")
# JSON control messages are tiny; anything larger is a broken or hostile peer
MAX_JSON_BYTES = 1 << 16


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
    """A peer sent something that is not a valid frame; the connection is closed."""


@dataclass(frozen=True)
class Frame:
    """One received frame.

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
    payload : bytearray
        The payload, complete.
    """

    kind: int
    dtype: int
    worker: int
    round: int
    seconds: float
    payload: bytearray

    def json(self):
        """The payload of a control frame, decoded."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{Kind.NAMES.get(self.kind)} payload is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{Kind.NAMES.get(self.kind)} payload is not a JSON object")
        return value

    def array(self):
        """The payload of a tensor frame as a 1-D NumPy array (sharing its memory)."""
        dt = DTYPES.get(self.dtype)
        if dt is None:
            raise ProtocolError(f"unknown dtype code {self.dtype}")
        if len(self.payload) % dt.itemsize:
            raise ProtocolError(
                f"payload of {len(self.payload)} bytes is not a whole number of {dt} values"
            )
        return np.frombuffer(self.payload, dtype=dt)


def encode(kind, payload=b"", *, dtype=0, worker=0, round=0, seconds=0.0):
    """Header and payload of a frame, ready for ``sendall`` or an outbox.

    Parameters
    ----------
    kind : int
        One of :class:`Kind`.
    payload : bytes-like, default=b""
        Payload; not copied.
    dtype : int, default=0
        Payload dtype code (0 for JSON).
    worker, round : int, default=0
        Header fields.
    seconds : float, default=0.0
        Header field.

    Returns
    -------
    parts : tuple of (bytes, memoryview)
    """
    view = memoryview(payload).cast("B")
    head = HEADER.pack(MAGIC, kind, dtype, PROTOCOL_VERSION, int(worker), int(round),
                       view.nbytes, float(seconds))
    return head, view


def encode_json(kind, obj, **header):
    """A control frame holding ``obj`` as JSON; see :func:`encode`."""
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode("utf-8"), **header)


def encode_tensor(kind, array, **header):
    """A tensor frame holding a 1-D NumPy array's raw bytes; see :func:`encode`."""
    array = np.ascontiguousarray(array)
    code = _CODES.get(array.dtype.newbyteorder("<"))
    if code is None:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}: use float32")
    return encode(kind, array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1),
                  dtype=code, **header)


class FrameReader:
    """Reassembles frames from a byte stream, checking each header.

    Parameters
    ----------
    max_tensor_bytes : int
        Largest tensor payload accepted. A header announcing more is a
        protocol error, raised before any of the payload is read.
    kinds : collection of int
        Frame kinds this side accepts.
    """

    def __init__(self, max_tensor_bytes, kinds):
        self.max_tensor_bytes = int(max_tensor_bytes)
        self.kinds = frozenset(kinds)
        self._buf = bytearray()
        self._head = None

    def feed(self, data):
        """Add received bytes; return the frames they complete.

        Raises
        ------
        ProtocolError
            On a bad magic number, version, kind, dtype or size.
        """
        self._buf += data
        frames = []
        while True:
            if self._head is None:
                if len(self._buf) < HEADER.size:
                    return frames
                self._head = self._check(HEADER.unpack_from(self._buf))
                del self._buf[:HEADER.size]
            nbytes = self._head[6]
            if len(self._buf) < nbytes:
                return frames
            payload = self._buf[:nbytes]
            del self._buf[:nbytes]
            _, kind, dtype, _, worker, rnd, _, seconds = self._head
            self._head = None
            frames.append(Frame(kind, dtype, worker, rnd, seconds, payload))

    @property
    def pending(self):
        """Bytes of an incomplete frame held back."""
        return len(self._buf) + (HEADER.size if self._head is not None else 0)

    def _check(self, head):
        magic, kind, dtype, version, _, _, nbytes, _ = head
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}: not a flagagg peer")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version}, this side speaks {PROTOCOL_VERSION}: run the same "
                "flagagg version on every node"
            )
        if kind not in self.kinds:
            raise ProtocolError(f"unexpected frame kind {Kind.NAMES.get(kind, kind)}")
        limit = self.max_tensor_bytes if kind in Kind.TENSOR else MAX_JSON_BYTES
        if nbytes > limit:
            raise ProtocolError(
                f"{Kind.NAMES[kind]} frame of {nbytes} bytes is over the {limit}-byte limit"
            )
        if kind in Kind.TENSOR and dtype not in DTYPES:
            raise ProtocolError(f"unknown dtype code {dtype}")
        return head


def send_frame(sock, parts):
    """Send a frame from :func:`encode` on a blocking socket."""
    # one write: a header sent on its own would wait for the peer's delayed ACK
    # (Nagle's algorithm) on sockets without TCP_NODELAY
    sock.sendall(b"".join(parts))


def recv_frame(sock, reader, pending, timeout):
    """Receive the next frame on a blocking socket.

    Parameters
    ----------
    sock : socket.socket
        Connected socket.
    reader : FrameReader
        The connection's reader.
    pending : list of Frame
        Frames received earlier and not yet returned; consumed first.
    timeout : float
        Seconds to wait in all.

    Returns
    -------
    frame : Frame

    Raises
    ------
    ConnectionError
        If the peer closed the connection.
    TimeoutError
        If no complete frame came within ``timeout``.
    """
    end = time.monotonic() + timeout
    while not pending:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no message within {timeout:g} s")
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            raise TimeoutError(f"no message within {timeout:g} s") from None
        if not data:
            raise ConnectionError("the connection was closed by the other side")
        pending.extend(reader.feed(data))
    return pending.pop(0)
