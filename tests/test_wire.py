import os
import struct
import tracemalloc

import lz4.block
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import WireError
from mesh.net.wire import (
    FLAG_CHUNK,
    FLAG_LZ4,
    PREFIX_SIZE,
    Encoder,
    Limits,
    Reassembler,
    encode_frame,
    parse_frame,
)

LIMITS = Limits()


def roundtrip(header, payload, compress=None, limits=LIMITS):
    frames = Encoder(limits).encode(header, payload, compress)
    r = Reassembler(limits)
    out = [r.feed(f) for f in frames]
    assert all(o is None for o in out[:-1])
    assert r.partial_count == 0
    return frames, out[-1]


@pytest.mark.parametrize("size", [0, 1, 1000, 60_000, 65_536, 200_000, 3_000_000])
@pytest.mark.parametrize("compress", [None, True, False])
def test_roundtrip(size, compress):
    payload = os.urandom(size // 2) + bytes(size - size // 2)
    frames, msg = roundtrip({"t": "x", "n": 7}, payload, compress)
    assert msg.header == {"t": "x", "n": 7} and msg.payload == payload
    assert all(len(f) <= LIMITS.max_frame for f in frames)


@pytest.mark.parametrize("size", [0, 4000, 4640, 84_000, 330_000])
@pytest.mark.parametrize("frame_size", [1200, 4640, 20_000, 10**9])
def test_messages_cut_to_a_frame_size_come_back_whole(size, frame_size):
    payload = os.urandom(size)
    frames = Encoder(LIMITS).encode({"t": "x"}, payload, frame_size=frame_size)
    r = Reassembler(LIMITS)
    out = [r.feed(f) for f in frames]
    assert out[-1].payload == payload and all(o is None for o in out[:-1])
    cap = min(max(frame_size, PREFIX_SIZE + 64 + 1024), LIMITS.max_frame)
    assert all(len(f) <= cap for f in frames)
    if frame_size < LIMITS.max_frame and size > 2 * frame_size:  # cut finer than the cap
        assert len(frames) > len(Encoder(LIMITS).encode({"t": "x"}, payload))


def test_a_header_too_large_for_the_frame_size_takes_a_first_frame_of_the_cap():
    header = {"t": "x", "big": "h" * 3900}  # leaves < 1 KiB of a 4640-byte frame
    payload = os.urandom(20_000)
    frames = Encoder(LIMITS).encode(header, payload, frame_size=4640)
    assert len(frames[0]) > 4640 and all(len(f) <= 4640 for f in frames[1:])
    r = Reassembler(LIMITS)
    msg = [r.feed(f) for f in frames][-1]
    assert msg.header == header and msg.payload == payload


def test_random_payload_not_compressed_and_zeros_are():
    frames, _ = roundtrip({}, os.urandom(10_000))
    assert not parse_frame(frames[0], LIMITS).flags & FLAG_LZ4
    frames, _ = roundtrip({}, bytes(10_000))
    assert parse_frame(frames[0], LIMITS).flags & FLAG_LZ4


def test_interleaved_chunked_messages():
    enc, r = Encoder(), Reassembler()
    a = enc.encode({"m": "a"}, os.urandom(300_000), False)
    b = enc.encode({"m": "b"}, os.urandom(200_000), False)
    got = []
    for i in range(max(len(a), len(b))):
        for frames in (a, b):
            if i < len(frames):
                m = r.feed(frames[i])
                if m:
                    got.append(m.header["m"])
    assert sorted(got) == ["a", "b"]


def test_reserved_header_keys_refused():
    with pytest.raises(WireError):
        Encoder().encode({"_z": 1}, b"")


def prefix(flags=0, header_len=0, payload_len=0, magic=b"EM", version=1):
    return struct.pack(">2sBBHI", magic, version, flags, header_len, payload_len)


def test_four_gib_declared_payload_refused_before_allocation():
    data = prefix(payload_len=0xFFFFFFFF) + b"\x80"
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="declared payload"):
            Reassembler().feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_four_gib_declared_message_and_raw_size_refused():
    for meta in (
        {"_m": 1, "_i": 0, "_n": 2, "_l": 1 << 32, "_h": {}},
        {"_m": 1, "_i": 0, "_n": 2, "_l": 2048, "_z": 1 << 32, "_h": {}},
    ):
        frame = encode_frame(FLAG_CHUNK | FLAG_LZ4, meta, b"x" * 1024, LIMITS)
        tracemalloc.start()
        try:
            with pytest.raises(WireError, match="outside"):
                Reassembler().feed(frame)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024


def test_lz4_bomb_refused():
    body = lz4.block.compress(bytes(1 << 20), store_size=False)
    frame = encode_frame(FLAG_LZ4, {"_z": 100}, body, LIMITS)  # lies about the raw size
    with pytest.raises(WireError, match="lz4"):
        Reassembler().feed(frame)


def test_partial_message_caps():
    limits = Limits(max_partial=2, max_partial_bytes=10 * 1024 * 1024)
    r = Reassembler(limits)
    for i in range(2):
        r.feed(
            encode_frame(
                FLAG_CHUNK, {"_m": i, "_i": 0, "_n": 3, "_l": 5000, "_h": {}}, b"x" * 2000, limits
            )
        )
    with pytest.raises(WireError, match="partial messages in flight"):
        r.feed(
            encode_frame(
                FLAG_CHUNK, {"_m": 9, "_i": 0, "_n": 3, "_l": 5000, "_h": {}}, b"x" * 2000, limits
            )
        )
    assert r.partial_count == 2
    r2 = Reassembler(limits)
    with pytest.raises(WireError, match="would hold"):
        r2.feed(
            encode_frame(
                FLAG_CHUNK,
                {"_m": 1, "_i": 0, "_n": 200, "_l": 11 * 1024 * 1024, "_h": {}},
                b"x" * 2000,
                limits,
            )
        )


def test_out_of_order_and_overrun():
    enc, r = Encoder(), Reassembler()
    frames = enc.encode({}, os.urandom(200_000), False)
    r.feed(frames[0])
    with pytest.raises(WireError, match="out of order"):
        r.feed(frames[2])
    assert r.partial_count == 0
    with pytest.raises(WireError, match="unknown message"):
        r.feed(frames[1])


def test_purge_drops_stale_partials():
    r = Reassembler()
    r.feed(Encoder().encode({}, os.urandom(200_000), False)[0])
    assert r.partial_count == 1
    assert r.purge(older_than=-1) == 1 and r.partial_count == 0


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "shorter"),
        (prefix(magic=b"XX"), "magic"),
        (prefix(version=9), "version"),
        (prefix(flags=0x80), "flags"),
        (prefix(header_len=5000), "declared header"),
        (prefix(header_len=1) + b"\x80" + b"junk", "length fields"),
        (prefix(header_len=1) + b"\xc1", "malformed header"),
        (prefix(header_len=1) + b"\x01", "must be a map"),
        (b"x" * (LIMITS.max_frame + 1), "exceeds cap"),
    ],
)
def test_malformed_frames(data, match):
    with pytest.raises(WireError, match=match):
        Reassembler().feed(data)


def _mutations(frame: bytes):
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(frame)).map(lambda n: frame[:n]),
        st.tuples(st.integers(0, len(frame) - 1), st.integers(0, 255)).map(
            lambda t: frame[: t[0]] + bytes([t[1]]) + frame[t[0] + 1 :]
        ),
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=512)).map(
            lambda t: prefix(FLAG_LZ4, t[0], t[1]) + t[2]
        ),
    )


SAMPLE = Encoder().encode({"t": "req", "id": 1}, bytes(3000))[0]
CHUNK = Encoder().encode({"t": "req"}, os.urandom(100_000), False)[0]


@pytest.mark.badinput
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutations(SAMPLE), _mutations(CHUNK)))
def test_fuzz_frames_only_raise_wire_error(data):
    r = Reassembler()
    try:
        r.feed(data)
    except WireError:
        pass


@pytest.mark.badinput
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_fuzz_chunk_sequences(parts):
    r = Reassembler(Limits(max_partial=2, max_partial_bytes=1 << 20))
    for i, part in enumerate(parts):
        meta = {"_m": i % 3, "_i": i % 4, "_n": 4, "_l": 4096, "_h": {}}
        try:
            r.feed(encode_frame(FLAG_CHUNK, meta, part, LIMITS))
        except WireError:
            pass
    assert r.partial_count <= 2


@pytest.mark.badinput
@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: not k.startswith("_")),
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=20)),
        max_size=8,
    ),
    st.binary(max_size=150_000),
)
def test_fuzz_roundtrip(header, payload):
    _, msg = roundtrip(header, payload)
    assert msg.header == header and msg.payload == payload


def test_header_unpack_never_uses_ext():
    raw = msgpack.packb({"a": msgpack.ExtType(1, b"x" * 10)})
    frame = prefix(header_len=len(raw)) + raw
    with pytest.raises(WireError):
        parse_frame(frame, LIMITS)
    assert PREFIX_SIZE == 10


def test_unencodable_header_is_wire_error():
    with pytest.raises(WireError, match="cannot be encoded"):
        Encoder().encode({"big": 2**70}, b"")


def test_abort_frame_frees_partial_message():
    enc, r = Encoder(), Reassembler()
    frames = enc.encode({}, os.urandom(300_000), False)
    r.feed(frames[0])
    r.feed(frames[1])
    assert r.partial_count == 1
    assert r.feed(enc.abort_frame(frames[0])) is None
    assert r.partial_count == 0
    assert enc.abort_frame(enc.encode({}, b"small")[0]) is None
