"""Frame format: a fixed prefix, a msgpack header and an optional lz4-compressed payload.

Frame layout (big-endian)::

    magic "EM" (2) | version (1) | flags (1) | header_len (u16) | payload_len (u32)
    header: msgpack map with str keys (header_len bytes)
    payload: payload_len bytes, lz4 block-compressed when FLAG_LZ4 is set

A message larger than one frame travels as FLAG_CHUNK frames: each carries ``_m`` (message id),
``_i`` (chunk index), ``_n`` (chunk count) and ``_l`` (total payload bytes on the wire); the
first chunk also carries the user header as ``_h``. A chunk frame ``{_m, _x: 1}`` aborts a
message whose sender gave up, so the receiver frees its partial bytes at once. A compressed
payload declares its raw size in ``_z``. Keys starting with ``_`` are reserved.

Every length field is checked against :class:`Limits` before anything is allocated or
decompressed; parsers are pure functions that raise :class:`~mesh.errors.WireError` only. A
header may nest containers at most :data:`MAX_DEPTH` deep (:func:`check_depth`, which every
decoder of peer msgpack applies), and :func:`brief` shows a peer's value in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import msgpack

from mesh.errors import Error, WireError

__all__ = [
    "SendBudget",
    "Limits",
    "Message",
    "Frame",
    "Encoder",
    "Reassembler",
    "parse_frame",
    "encode_frame",
    "decode_single",
    "FLAG_LZ4",
    "FLAG_CHUNK",
    "PREFIX_SIZE",
    "MAX_DEPTH",
    "check_depth",
    "brief",
]

MAGIC = b"EM"
VERSION = 1
FLAG_LZ4 = 0x01
FLAG_CHUNK = 0x02
_KNOWN_FLAGS = FLAG_LZ4 | FLAG_CHUNK
_PREFIX = struct.Struct(">2sBBHI")
PREFIX_SIZE = _PREFIX.size
# Room kept in every chunk frame for the chunk bookkeeping keys.
_CHUNK_META_ROOM = 64
# Containers nested in one decoded value. msgpack decodes 1024 levels, but repr() and str()
# of a value some 990 deep raise RecursionError, which no caller expects. The project's own
# headers nest 6 levels at most (measured: a chunk's _h, a request, its params, the trace
# list, an entry of it), its signed records and payloads fewer.
MAX_DEPTH = 32
_CONTAINERS = (dict, list, tuple)  # what msgpack and json decode into
# Characters of a peer's value that an error message shows.
_BRIEF = 60
# Compress only when a sample shrinks at least this much: quantized weights and float
# activations do not compress, and trying costs time on every hop.
_SAMPLE = 4096
_MIN_GAIN = 0.9


@dataclass(frozen=True)
class Limits:
    """Hard caps, checked before allocation. One instance is shared per link."""

    max_header: int = 4096
    max_frame: int = 64 * 1024
    max_message: int = 16 * 1024 * 1024
    max_partial: int = 16
    max_partial_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_header < 256 or self.max_header > 0xFFFF:
            raise ValueError("max_header must be in [256, 65535]")
        if self.max_frame < PREFIX_SIZE + self.max_header + 1024:
            raise ValueError("max_frame must leave room for a header and 1 KiB of payload")
        if self.max_message < 1 or self.max_partial < 1 or self.max_partial_bytes < 1:
            raise ValueError("limits must be positive")


@dataclass(frozen=True)
class Frame:
    flags: int
    header: dict[str, Any]
    payload: bytes


@dataclass
class Message:
    header: dict[str, Any]
    payload: bytes = b""


def _pack(obj: Any) -> bytes:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True))
    except (OverflowError, TypeError, ValueError) as exc:
        raise WireError(f"header cannot be encoded: {exc}") from None


def encode_frame(flags: int, header: dict[str, Any], payload: bytes, limits: Limits) -> bytes:
    packed = _pack(header)
    if len(packed) > limits.max_header:
        raise WireError(f"header of {len(packed)} bytes exceeds cap {limits.max_header}")
    size = PREFIX_SIZE + len(packed) + len(payload)
    if size > limits.max_frame:
        raise WireError(f"frame of {size} bytes exceeds cap {limits.max_frame}")
    return _PREFIX.pack(MAGIC, VERSION, flags, len(packed), len(payload)) + packed + payload


def parse_frame(data: bytes, limits: Limits) -> Frame:
    """Parse one frame. Raises :class:`WireError` with a precise message on any defect."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"frame must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_frame:
        raise WireError(f"frame of {len(data)} bytes exceeds cap {limits.max_frame}")
    if len(data) < PREFIX_SIZE:
        raise WireError(f"frame of {len(data)} bytes is shorter than its {PREFIX_SIZE}-byte prefix")
    magic, version, flags, header_len, payload_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad magic")
    if version != VERSION:
        raise WireError(f"unsupported wire version {version}")
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown flags 0x{flags:02x}")
    if header_len > limits.max_header:
        raise WireError(f"declared header of {header_len} bytes exceeds cap {limits.max_header}")
    if payload_len > limits.max_frame:
        raise WireError(f"declared payload of {payload_len} bytes exceeds cap {limits.max_frame}")
    if PREFIX_SIZE + header_len + payload_len != len(data):
        raise WireError(
            f"length fields say {PREFIX_SIZE + header_len + payload_len} bytes, "
            f"frame has {len(data)}"
        )
    header = _unpack_header(bytes(data[PREFIX_SIZE : PREFIX_SIZE + header_len]))
    payload = bytes(data[PREFIX_SIZE + header_len :])
    return Frame(flags, header, payload)


def _unpack_header(raw: bytes) -> dict[str, Any]:
    try:
        # Bounds derived from the (already capped) header size: nothing in it can be longer.
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=len(raw),
            max_bin_len=len(raw),
            max_array_len=len(raw),
            max_map_len=len(raw),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"malformed header: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    check_depth(header)
    return header


def check_depth(
    value: Any, error: type[Error] = WireError, what: str = "header", limit: int = MAX_DEPTH
) -> None:
    """Raise ``error`` when containers in ``value`` (a decoded msgpack value) nest more
    than ``limit`` deep: a map or list is one level, a scalar none. Level by level, not
    recursion: the value is what recursion cannot take. Each element costs one step, and a
    decoder caps the elements by the bytes it read. It runs on every frame's header: a
    stage's step header takes ~5 us (a stack of (item, depth) pairs took 11)."""
    level = [value] if value.__class__ in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise error(f"{what} nests containers deeper than {limit} levels")
        below: list[Any] = []
        for item in level:
            # a map's keys too: a decoder that allows container keys gives them (tuples)
            items = (*item, *item.values()) if item.__class__ is dict else item
            below += [c for c in items if c.__class__ in _CONTAINERS]
        level = below


def brief(value: Any) -> str:
    """A peer's value for an error message: a container by its type and size only (its repr
    may be long), a string or bytes cut to a few dozen characters."""
    if isinstance(value, dict | list | tuple):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, str | bytes) and len(value) > _BRIEF:
        return f"{value[:_BRIEF]!r}..."
    return repr(value)


def _int_field(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int:
        raise WireError(f"field {key!r} missing or not an integer")
    if not low <= value <= high:
        raise WireError(f"field {key!r}={value} outside [{low}, {high}]")
    return value


def _decompress(body: bytes, raw_size: int) -> bytes:
    try:
        # uncompressed_size bounds the output buffer: a lying block cannot grow it.
        out = lz4.block.decompress(body, uncompressed_size=raw_size)
    except lz4.block.LZ4BlockError as exc:
        raise WireError(f"corrupt lz4 payload: {exc}") from None
    if len(out) != raw_size:
        raise WireError(f"lz4 payload decompressed to {len(out)} bytes, declared {raw_size}")
    return bytes(out)


def decode_single(frame: Frame, limits: Limits) -> Message:
    """Turn a non-chunk frame into a message (decompressing when flagged)."""
    if frame.flags & FLAG_CHUNK:
        raise WireError("chunk frame where a whole message was expected")
    header = dict(frame.header)
    payload = frame.payload
    if frame.flags & FLAG_LZ4:
        raw = _int_field(header, "_z", 0, limits.max_message)
        del header["_z"]
        payload = _decompress(payload, raw)
    return Message(header, payload)


def _should_compress(payload: bytes) -> bool:
    if len(payload) < 512:
        return False
    sample = payload[:_SAMPLE]
    return len(lz4.block.compress(sample, store_size=False)) < _MIN_GAIN * len(sample)


class Encoder:
    """Splits messages into frames. One per link direction: it numbers chunked messages."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._next_id = 0

    def encode(
        self,
        header: dict[str, Any],
        payload: bytes = b"",
        compress: bool | None = None,
        frame_size: int | None = None,
    ) -> list[bytes]:
        """Frames for one message. ``compress=None`` compresses when a sample shows a gain.
        ``frame_size``: cut it into frames of at most this many bytes (not above the cap); a
        first frame whose header leaves no room for 1 KiB of payload takes the cap's size."""
        limits = self.limits
        size = limits.max_frame if frame_size is None else min(frame_size, limits.max_frame)
        if any(not isinstance(k, str) or k.startswith("_") for k in header):
            raise WireError("header keys must be str and must not start with '_'")
        if len(payload) > limits.max_message:
            raise WireError(f"message of {len(payload)} bytes exceeds cap {limits.max_message}")
        flags = 0
        body = bytes(payload)
        wire_header = dict(header)
        if compress if compress is not None else _should_compress(body):
            packed = lz4.block.compress(body, store_size=False)
            if len(packed) < len(body):
                flags |= FLAG_LZ4
                wire_header["_z"] = len(body)
                body = packed
        single_room = size - PREFIX_SIZE - len(_pack(wire_header))
        if len(body) <= single_room:
            return [encode_frame(flags, wire_header, body, limits)]
        return list(self._chunks(flags, wire_header, body, size))

    def abort_frame(self, first_frame: bytes) -> bytes | None:
        """A frame telling the receiver to drop a chunked message we stopped sending."""
        frame = parse_frame(first_frame, self.limits)
        if not frame.flags & FLAG_CHUNK:
            return None
        return encode_frame(FLAG_CHUNK, {"_m": frame.header["_m"], "_x": 1}, b"", self.limits)

    def _chunks(
        self, flags: int, header: dict[str, Any], body: bytes, size: int
    ) -> Iterator[bytes]:
        limits = self.limits
        first: dict[str, Any] = {"_h": {k: v for k, v in header.items() if k != "_z"}}
        if "_z" in header:
            first["_z"] = header["_z"]
        header_room = len(_pack(first))
        room = max(size, PREFIX_SIZE + _CHUNK_META_ROOM + 1024) - PREFIX_SIZE - _CHUNK_META_ROOM
        first_room = room - header_room
        if first_room < 1024:  # a large header: the first frame may be as large as the cap
            first_room = limits.max_frame - PREFIX_SIZE - _CHUNK_META_ROOM - header_room
        if first_room < 1024:
            raise WireError("header too large to leave room for payload in the first chunk")
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        count = 1 + -(-max(0, len(body) - first_room) // room)
        pos = 0
        for index in range(count):
            take = first_room if index == 0 else room
            meta: dict[str, Any] = {"_m": msg_id, "_i": index, "_n": count, "_l": len(body)}
            if index == 0:
                meta.update(first)
            yield encode_frame(flags | FLAG_CHUNK, meta, body[pos : pos + take], limits)
            pos += take


@dataclass
class _Partial:
    header: dict[str, Any]
    raw_size: int | None
    total: int
    count: int
    started: float
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class Reassembler:
    """Stateful receiver for one link: feeds frames, returns whole messages.

    Bounded: at most ``max_partial`` messages and ``max_partial_bytes`` declared bytes are in
    flight at once; each message's chunks must arrive in order (data channels are ordered).
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._partial: dict[int, _Partial] = {}
        self._pending_bytes = 0

    @property
    def partial_count(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> Message | None:
        frame = parse_frame(data, self.limits)
        if not frame.flags & FLAG_CHUNK:
            return decode_single(frame, self.limits)
        return self._feed_chunk(frame)

    def _feed_chunk(self, frame: Frame) -> Message | None:
        h = frame.header
        msg_id = _int_field(h, "_m", 0, 0xFFFFFFFF)
        if h.get("_x") == 1:  # the sender gave up on this message (its caller timed out)
            self._drop(msg_id)
            return None
        index = _int_field(h, "_i", 0, 0xFFFFFFFF)
        if index == 0:
            partial = self._start(frame, msg_id)
        else:
            found = self._partial.get(msg_id)
            if found is None:
                raise WireError(f"chunk {index} of unknown message {msg_id}")
            partial = found
            if index != len(partial.parts):
                self._drop(msg_id)
                raise WireError(f"chunk {index} of message {msg_id} out of order")
            if _int_field(h, "_n", 1, 0xFFFFFFFF) != partial.count:
                self._drop(msg_id)
                raise WireError(f"chunk count of message {msg_id} changed")
        if partial.received + len(frame.payload) > partial.total:
            self._drop(msg_id)
            raise WireError(f"message {msg_id} overruns its declared {partial.total} bytes")
        partial.parts.append(frame.payload)
        partial.received += len(frame.payload)
        if len(partial.parts) < partial.count:
            return None
        self._drop(msg_id)
        if partial.received != partial.total:
            raise WireError(
                f"message {msg_id} ended at {partial.received} of {partial.total} bytes"
            )
        body = b"".join(partial.parts)
        if partial.raw_size is not None:
            body = _decompress(body, partial.raw_size)
        return Message(partial.header, body)

    def _start(self, frame: Frame, msg_id: int) -> _Partial:
        limits = self.limits
        h = frame.header
        if msg_id in self._partial:
            self._drop(msg_id)
            raise WireError(f"message {msg_id} restarted while in flight")
        count = _int_field(h, "_n", 1, 0xFFFFFFFF)
        total = _int_field(h, "_l", 0, limits.max_message)
        if count > total // 1024 + 2:  # every chunk but the last carries >= 1 KiB
            raise WireError(f"message {msg_id}: {count} chunks for {total} bytes")
        compressed = bool(frame.flags & FLAG_LZ4)
        raw_size = _int_field(h, "_z", 0, limits.max_message) if compressed else None
        inner = h.get("_h")
        if not isinstance(inner, dict) or any(not isinstance(k, str) for k in inner):
            raise WireError(f"message {msg_id}: first chunk lacks a header map")
        if len(self._partial) >= limits.max_partial:
            raise WireError(f"more than {limits.max_partial} partial messages in flight")
        reserve = max(total, raw_size or 0)
        if self._pending_bytes + reserve > limits.max_partial_bytes:
            raise WireError(
                f"partial messages would hold {self._pending_bytes + reserve} bytes, "
                f"cap {limits.max_partial_bytes}"
            )
        partial = _Partial(dict(inner), raw_size, total, count, time.monotonic())
        self._partial[msg_id] = partial
        self._pending_bytes += reserve
        return partial

    def _drop(self, msg_id: int) -> None:
        partial = self._partial.pop(msg_id, None)
        if partial is not None:
            self._pending_bytes -= max(partial.total, partial.raw_size or 0)

    def purge(self, older_than: float) -> int:
        """Drop partial messages started more than ``older_than`` seconds ago (slow senders)."""
        cutoff = time.monotonic() - older_than
        stale = [m for m, p in self._partial.items() if p.started < cutoff]
        for msg_id in stale:
            self._drop(msg_id)
        return len(stale)


class SendBudget:
    """The sender's side of the receiver's reassembly caps: a multi-frame message holds a
    slot and its bytes until its last frame is sent, and at most half the receiver's
    ``max_partial`` messages and ``max_partial_bytes`` are in flight at once (so replies and
    the other side's traffic fit too). Without it, 32 concurrent 1 MiB calls interleaved 32
    partial messages and the receiver closed the link (a protocol error past 16)."""

    def __init__(self, limits: Limits) -> None:
        self._slots = max(1, limits.max_partial // 2)
        self._bytes = max(1, limits.max_partial_bytes // 2)
        self._used_slots = 0
        self._used_bytes = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            # a message over the byte budget still goes, alone
            await self._changed.wait_for(
                lambda: (
                    self._used_slots < self._slots
                    and (self._used_slots == 0 or self._used_bytes + size <= self._bytes)
                )
            )
            self._used_slots += 1
            self._used_bytes += size
        try:
            yield
        finally:
            async with self._changed:
                self._used_slots -= 1
                self._used_bytes -= size
                self._changed.notify_all()
