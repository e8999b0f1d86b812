"""The wire format between the parameter server and its workers, and how peers prove membership.

A connection starts with a fixed-size handshake in which both sides prove
that they know the run's secret (HMAC-SHA256 challenge-response, mutual),
then carries frames: a fixed 36-byte header, ``nbytes`` of payload and a
32-byte tag, an HMAC-SHA256 of the header and payload under a key of this
connection, with the frame's direction and sequence number inside. A frame
replayed (on this connection or another), reordered, reflected or changed
in any byte fails its tag and closes the connection. Tensors travel as their
raw little-endian bytes (the header names the dtype), control messages as
small JSON objects; nothing is ever unpickled.

The handshake (``K`` the secret, ``Ns``, ``Nc`` fresh 32-byte nonces)::

    server -> worker  CHALLENGE  b"FLAGAUTH" version(2) Ns                      42 bytes
    worker -> server  RESPONSE   b"FLAGAUTH" version(2) Nc HMAC(K, "worker"|Ns|Nc) 74 bytes
    server -> worker  PROOF      HMAC(K, "server"|Ns|Nc)                       32 bytes

The server reads exactly the response's 74 bytes from a peer that has not
proved itself, and nothing else; a wrong response closes the connection with
no answer. A worker that gets a wrong proof knows it reached something that
is not the run's server. The connection's frame key is
``HMAC(K, "frames"|Ns|Nc)``.

The server reads frames with :class:`FrameReader`, which holds a frame back
until all of it has arrived and its tag is checked, so a worker that dies
mid-message leaves nothing behind to aggregate, and refuses a header whose
size is over the limit before reading its payload, so a worker cannot make
the server buffer without bound.

Header (little-endian)::

    magic  4s   b"FLAG"
    kind   B    HELLO, WELCOME, REJECT, PARAMS, GRAD, STOP
    dtype  B    0 for JSON, else a code of DTYPES
    version H   PROTOCOL_VERSION
    worker I    the worker a GRAD comes from
    round  Q    the training round a PARAMS or GRAD belongs to
    nbytes Q    payload size
    seconds d   GRAD: the worker's compute time for the round

Tag: ``HMAC(frame key, direction(1) | sequence(8, little-endian) | header |
A)``, direction 0 from the server, 1 from a worker, sequence counting that
direction's frames on the connection from 0. ``A`` is the payload itself
when it has at most ``INLINE_PAYLOAD_BYTES`` (64 KiB: control messages,
small models), else ``Poly1305(one-time key, payload)`` with the one-time
key ``HMAC(frame key, "payload" | direction | sequence)``; the header holds
the size, so the two cases cannot be confused.
Poly1305 is a one-time authenticator: a key unique to each frame (the
sequence never repeats on a connection, and each connection has its own
frame key) and secret (derived from the run's secret) makes a forged
payload pass with probability at most ``8 * ceil(n / 16) / 2**106`` for an
``n``-byte payload (about 1e-26 for a 1.2 MB gradient), and the HMAC binds
that authenticator to the header, the direction and the sequence. Poly1305
runs at about four times SHA-256's speed with the vector units of current
x86 CPUs (0.2 vs 0.8 ms per 1.2 MB frame here), and can be computed in
pieces: a receiver authenticates each piece as it arrives, overlapping the
network, and a sender puts the payload on the wire first and computes the
tag that follows it meanwhile. Poly1305 comes from the ``cryptography``
package (OpenSSL's implementation), the one dependency the distributed part
adds.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import struct
import time
from dataclasses import dataclass

import numpy as np

try:
    from cryptography.hazmat.primitives.poly1305 import Poly1305
except ImportError:  # pragma: no cover - the distributed extra installs it
    Poly1305 = None

__all__ = [
    "CHALLENGE_BYTES",
    "DTYPES",
    "HEADER",
    "MIN_SECRET_BYTES",
    "PROOF_BYTES",
    "RESPONSE_BYTES",
    "TAG_BYTES",
    "AuthError",
    "NO_FRAME_TAGS_VARIABLE",
    "PayloadMac",
    "Sealer",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameReader",
    "ProtocolError",
    "Kind",
    "encode",
    "encode_json",
    "encode_tensor",
    "challenge",
    "frame_tags_enabled",
    "check_proof",
    "check_response",
    "load_secret",
    "recv_frame",
    "recv_exactly",
    "respond",
    "send_frame",
    "session_key",
]

MAGIC = b"FLAG"
# 3: payloads authenticated by Poly1305 under a one-time key (2: by SHA-256)
PROTOCOL_VERSION = 3
HEADER = struct.Struct("<4sBBHIQQd")
AUTH_MAGIC = b"FLAGAUTH"
_AUTH_HEAD = struct.Struct("<8sH")
NONCE_BYTES = 32
TAG_BYTES = 32
CHALLENGE_BYTES = _AUTH_HEAD.size + NONCE_BYTES             # 42
RESPONSE_BYTES = _AUTH_HEAD.size + NONCE_BYTES + TAG_BYTES  # 74
PROOF_BYTES = TAG_BYTES
# a shorter secret can be guessed offline from one recorded handshake
MIN_SECRET_BYTES = 16
FROM_SERVER, FROM_WORKER = 0, 1
# JSON control messages are tiny; anything larger is a broken or hostile peer
MAX_JSON_BYTES = 1 << 16
# payloads up to this size are authenticated inside the tag's HMAC, larger ones by Poly1305
INLINE_PAYLOAD_BYTES = 1 << 16
# Set to "1" in every process of a run, frame tags are neither computed nor
# checked (the handshake still is). For measuring what they cost, on loopback
# only: see frame_tags_enabled. No command-line flag sets it.
NO_FRAME_TAGS_VARIABLE = "FLAGAGG_INSECURE_NO_FRAME_TAGS_FOR_BENCHMARKS"


def frame_tags_enabled():
    """Whether frames are tagged and checked (always, unless a benchmark turned it off).

    ``FLAGAGG_INSECURE_NO_FRAME_TAGS_FOR_BENCHMARKS=1`` turns the per-frame
    HMAC off in the process that reads it, so that a benchmark can measure
    round times with and without it; the wire format stays the same (the tag
    field is sent as zeros) and the handshake still runs. Anyone who can
    change bytes on the path can then change every message: the server
    refuses it unless it listens on loopback.
    """
    return os.environ.get(NO_FRAME_TAGS_VARIABLE) != "1"


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


class AuthError(ProtocolError):
    """A peer failed to prove that it knows the run's secret."""


def load_secret(text=None, *, path=None):
    """The run's secret as bytes, from its text or a file, checked for length.

    Parameters
    ----------
    text : str or bytes, optional
        The secret itself (e.g. ``FLAGAGG_SECRET``).
    path : str or path-like, optional
        A file holding it (surrounding whitespace is ignored).

    Returns
    -------
    secret : bytes

    Raises
    ------
    ValueError
        If neither or both are given, or the secret is shorter than
        ``MIN_SECRET_BYTES``.
    """
    if (text is None) == (path is None):
        raise ValueError("give the secret either as text or as a file, not both or neither")
    if path is not None:
        with open(path, "rb") as fh:
            secret = fh.read().strip()
        where = f"secret file {path}"
    else:
        secret = (text.encode("utf-8") if isinstance(text, str) else bytes(text)).strip()
        where = "the secret"
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{where} has {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}: make one with "
            "`python -c \"import secrets; print(secrets.token_hex(32))\"`"
        )
    return secret


def _mac(key, *parts):
    # the parts are small (a frame's header, nonces, an authenticator); the one-shot
    # hmac.digest is several times faster than an hmac.new object for them
    return hmac.digest(key, b"".join(parts), "sha256")


def challenge():
    """The server's first message on a connection and its nonce: (bytes, nonce)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return _AUTH_HEAD.pack(AUTH_MAGIC, PROTOCOL_VERSION) + nonce, nonce


def _auth_head(data, what):
    magic, version = _AUTH_HEAD.unpack_from(data)
    if magic != AUTH_MAGIC:
        raise AuthError(f"{what} does not start like a flagagg handshake")
    if version != PROTOCOL_VERSION:
        raise AuthError(f"{what} speaks protocol version {version}, this side "
                        f"{PROTOCOL_VERSION}: run the same flagagg version on every node")


def respond(secret, data):
    """The worker's answer to a server's challenge ``data``.

    Returns
    -------
    response : bytes
        What to send.
    server_nonce, worker_nonce : bytes
        For :func:`check_proof` and :func:`session_key`.

    Raises
    ------
    AuthError
        If ``data`` is not a challenge of this protocol version.
    """
    if len(data) != CHALLENGE_BYTES:
        raise AuthError("the challenge has the wrong size")
    _auth_head(data, "the server's challenge")
    ns = bytes(data[_AUTH_HEAD.size:])
    nc = secrets.token_bytes(NONCE_BYTES)
    head = _AUTH_HEAD.pack(AUTH_MAGIC, PROTOCOL_VERSION)
    return head + nc + _mac(secret, b"worker", ns, nc), ns, nc


def check_response(secret, server_nonce, data):
    """Check a worker's response; return (proof to send back, worker nonce).

    Raises
    ------
    AuthError
        If the response is malformed or its HMAC is wrong (the peer does not
        know the secret).
    """
    if len(data) != RESPONSE_BYTES:
        raise AuthError("the response has the wrong size")
    _auth_head(data, "the response")
    nc = bytes(data[_AUTH_HEAD.size:_AUTH_HEAD.size + NONCE_BYTES])
    tag = bytes(data[_AUTH_HEAD.size + NONCE_BYTES:])
    if not hmac.compare_digest(tag, _mac(secret, b"worker", server_nonce, nc)):
        raise AuthError("wrong HMAC in the response: the peer does not know the run's secret")
    return _mac(secret, b"server", server_nonce, nc), nc


def check_proof(secret, server_nonce, worker_nonce, data):
    """Check the server's proof that it knows the secret.

    Raises
    ------
    AuthError
        If it is wrong: whatever answered is not the run's server.
    """
    if len(data) != PROOF_BYTES or not hmac.compare_digest(
            bytes(data), _mac(secret, b"server", server_nonce, worker_nonce)):
        raise AuthError("the server did not prove that it knows the run's secret: the address "
                        "leads to something that is not this run's server")


def session_key(secret, server_nonce, worker_nonce):
    """The key of a connection's frame tags."""
    return _mac(secret, b"frames", server_nonce, worker_nonce)


def _poly1305(key):
    if Poly1305 is None:
        raise ImportError(
            "flagagg's distributed training authenticates its messages with Poly1305 from the "
            "`cryptography` package, which is not installed: pip install \"flagagg[distributed]\" "
            "(or: pip install cryptography)"
        )
    return Poly1305(key)


class PayloadMac:
    """The authentication of one frame's payload, fed in pieces as they are sent or arrive.

    Made by :meth:`Sealer.begin`, one per frame. A payload of more than
    ``INLINE_PAYLOAD_BYTES`` is authenticated by Poly1305 under the frame's
    one-time key; a smaller one goes into the tag's HMAC itself (setting up
    Poly1305 costs more than hashing a few kilobytes). The pieces fed must
    stay unchanged until :meth:`tag`. While frame tags are off (a
    benchmark) it computes nothing.
    """

    __slots__ = ("_sealer", "_seq", "_poly", "_pieces")

    def __init__(self, sealer, seq, nbytes):
        self._sealer, self._seq = sealer, seq
        self._poly = self._pieces = None
        if not sealer.enabled:
            return
        if nbytes <= INLINE_PAYLOAD_BYTES:
            self._pieces = []
        else:
            self._poly = _poly1305(_mac(sealer.key, b"payload", sealer.direction, seq))

    def update(self, piece):
        """Add the next bytes of the payload."""
        if self._poly is not None:
            self._poly.update(piece)
        elif self._pieces is not None:
            self._pieces.append(piece)

    def tag(self, head):
        """The frame's tag, over ``head`` and the payload fed so far (call once)."""
        sealer = self._sealer
        if self._poly is not None:
            auth, self._poly = self._poly.finalize(), None
            return _mac(sealer.key, sealer.direction, self._seq, head, auth)
        if self._pieces is not None:
            pieces, self._pieces = self._pieces, None
            return _mac(sealer.key, sealer.direction, self._seq, head, *pieces)
        return bytes(TAG_BYTES)


class Sealer:
    """Tags the frames one side sends on one connection (and checks those it reads).

    Parameters
    ----------
    key : bytes
        The connection's key (:func:`session_key`).
    direction : int
        ``FROM_SERVER`` or ``FROM_WORKER``.
    """

    def __init__(self, key, direction):
        self.key = key
        self.direction = bytes([direction])
        self.sequence = 0
        self.enabled = frame_tags_enabled()

    def begin(self, nbytes):
        """The :class:`PayloadMac` of the next frame, ``nbytes`` long (advances the sequence)."""
        seq = self.sequence.to_bytes(8, "little")
        self.sequence += 1
        return PayloadMac(self, seq, nbytes)

    def tag(self, head, payload=b""):
        """The tag of the next frame, its payload given whole (advances the sequence)."""
        view = memoryview(payload).cast("B")
        mac = self.begin(view.nbytes)
        mac.update(view)
        return mac.tag(head)

    def seal(self, parts):
        """A frame from :func:`encode` with its tag appended: (header, payload, tag)."""
        head, view = parts
        return head, view, self.tag(head, view)


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
    payload : bytearray or ndarray of uint8
        The payload, complete (a tensor's in a NumPy byte array).
    """

    kind: int
    dtype: int
    worker: int
    round: int
    seconds: float
    payload: object

    def json(self):
        """The payload of a control frame, decoded."""
        try:
            value = json.loads(bytes(self.payload).decode("utf-8"))
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
    """Reassembles frames from a byte stream, checking each header and tag.

    The bytes go straight into the frame's own buffer: :meth:`buffer` says
    where the next ones go (for ``recv_into``), :meth:`received` how many
    came; :meth:`feed` copies bytes in from elsewhere. The payload is
    authenticated as it arrives, so that checking the tag of a large frame
    costs little more than its last piece: the work on the rest overlaps the
    wait for the network. Nothing of a frame is handed on before its tag is
    checked.

    Parameters
    ----------
    max_tensor_bytes : int
        Largest tensor payload accepted. A header announcing more is a
        protocol error, raised before any of the payload is read.
    kinds : collection of int
        Frame kinds this side accepts.
    key : bytes
        The connection's key (:func:`session_key`).
    direction : int
        Who sends what this reader reads: ``FROM_SERVER`` or ``FROM_WORKER``.
    """

    def __init__(self, max_tensor_bytes, kinds, *, key, direction):
        self.max_tensor_bytes = int(max_tensor_bytes)
        self.kinds = frozenset(kinds)
        # the sender's sequence, checked through the tag
        self._opener = Sealer(key, direction)
        self._raw = bytearray(HEADER.size)
        self._tag = bytearray(TAG_BYTES)
        self._head = None     # the checked header of the frame being read
        self._payload = None
        self._view = None
        self._mac = None      # the PayloadMac of the frame being read
        self._part = 0        # 0: header, 1: payload, 2: tag
        self._got = 0         # bytes of the current part received

    def buffer(self):
        """Where the next bytes go: the rest of the current part, a writable memoryview."""
        if self._part == 0:
            return memoryview(self._raw)[self._got:]
        if self._part == 1:
            return self._view[self._got:]
        return memoryview(self._tag)[self._got:]

    def received(self, k):
        """Count ``k`` bytes written at the start of :meth:`buffer`.

        Returns
        -------
        frame : Frame or None
            The frame they complete, if they do.

        Raises
        ------
        ProtocolError
            On a bad magic number, version, kind, dtype or size, or a tag that
            does not match (a forged, changed, replayed or reordered frame).
        """
        if self._part == 1:
            self._mac.update(self._view[self._got:self._got + k])
        self._got += k
        if self._part == 0:
            if self._got < HEADER.size:
                return None
            self._head = self._check(HEADER.unpack(self._raw))
            kind, nbytes = self._head[1], self._head[6]
            # np.empty takes the pages of a large payload from the system as the
            # bytes arrive, not before
            self._payload = np.empty(nbytes, np.uint8) if kind in Kind.TENSOR \
                else bytearray(nbytes)
            self._view = memoryview(self._payload).cast("B")
            self._mac = self._opener.begin(nbytes)
            self._part, self._got = 1, 0
        if self._part == 1:
            if self._got < len(self._view):
                return None
            self._part, self._got = 2, 0
            return None
        if self._got < TAG_BYTES:
            return None
        head, payload = self._head, self._payload
        expected = self._mac.tag(bytes(self._raw))
        if self._opener.enabled and not hmac.compare_digest(bytes(self._tag), expected):
            raise ProtocolError(
                f"{Kind.NAMES[head[1]]} frame with a wrong tag: forged, changed, "
                "replayed or out of order"
            )
        self._head = self._payload = self._view = self._mac = None
        self._part = self._got = 0
        return _frame(head, payload)

    def feed(self, data):
        """Add received bytes (copied in); return the frames they complete.

        Raises
        ------
        ProtocolError
            As :meth:`received`.
        """
        data = memoryview(data).cast("B")
        frames = []
        while data.nbytes:
            buf = self.buffer()
            k = min(buf.nbytes, data.nbytes)
            buf[:k] = data[:k]
            data = data[k:]
            frame = self.received(k)
            if frame is not None:
                frames.append(frame)
        return frames

    def unchecked(self):
        """The frame whose payload is complete and whose tag has not arrived yet, or None.

        Neither its header nor its payload is authenticated yet: only for
        work whose result is used once the tag has checked, and thrown away
        (with the connection) when it does not, such as computing a gradient
        while the tag is in flight. The payload must not be changed.
        """
        if self._part != 2 or self._got:
            return None
        return _frame(self._head, self._payload)

    @property
    def pending(self):
        """Bytes of an incomplete frame held back."""
        if self._part == 0:
            return self._got
        return HEADER.size + self._got + (len(self._view) if self._part == 2 else 0)

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


def _frame(head, payload):
    """The :class:`Frame` of an unpacked header and its payload."""
    _, kind, dtype, _, worker, rnd, _, seconds = head
    return Frame(kind, dtype, worker, rnd, seconds, payload)


def send_frame(sock, parts, sealer):
    """Send a frame from :func:`encode`, tagged by ``sealer``, on a blocking socket."""
    head, view = parts
    if view.nbytes > 1 << 16:
        # a large payload goes out from its own buffer, before its tag is computed:
        # the peer receives and authenticates it while this side does too
        sock.sendall(head)
        sock.sendall(view)
        sock.sendall(sealer.tag(head, view))
    else:
        # one write: a header sent on its own would wait for the peer's delayed ACK
        # (Nagle's algorithm) on sockets without TCP_NODELAY
        sock.sendall(b"".join((head, view, sealer.tag(head, view))))


def recv_exactly(sock, n, timeout):
    """Receive exactly ``n`` bytes on a blocking socket within ``timeout`` seconds.

    Raises
    ------
    ConnectionError
        If the peer closed the connection first.
    TimeoutError
        If they did not arrive in time.
    """
    end = time.monotonic() + timeout
    buf = bytearray()
    while len(buf) < n:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete message within {timeout:g} s")
        sock.settimeout(left)
        try:
            data = sock.recv(n - len(buf))
        except TimeoutError:
            raise TimeoutError(f"no complete message within {timeout:g} s") from None
        if not data:
            raise ConnectionError("the connection was closed by the other side")
        buf += data
    return bytes(buf)


def recv_frame(sock, reader, pending, timeout, early=None):
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
    early : callable, optional
        Called as ``early(frame)`` once, with the :meth:`FrameReader.unchecked`
        frame, when a frame's payload has arrived and its tag has not: work
        that overlaps the wait for the tag. With ``early``, the return value
        is ``(frame, result)``, ``result`` being what ``early`` returned for
        this frame (None when it was not called); it belongs to a frame
        whose tag has checked, the same bytes ``early`` saw.

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
    result = None
    while not pending:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no message within {timeout:g} s")
        sock.settimeout(left)
        try:
            k = sock.recv_into(reader.buffer())
        except TimeoutError:
            raise TimeoutError(f"no message within {timeout:g} s") from None
        if not k:
            raise ConnectionError("the connection was closed by the other side")
        frame = reader.received(k)
        if frame is not None:
            pending.append(frame)
        elif early is not None:
            unchecked = reader.unchecked()
            if unchecked is not None:
                result = early(unchecked)
    if early is None:
        return pending.pop(0)
    # the early result is for the frame that completed in this call, never for one
    # that was already pending
    return pending.pop(0), result
