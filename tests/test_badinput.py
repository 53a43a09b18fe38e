"""The bad-input suite (issue 8): every parser of network bytes not fuzzed elsewhere.

Each test feeds one parser hypothesis-generated input and lets only that parser's own error
class escape; anything else (KeyError, TypeError, an allocation blow-up) fails the test. The
example count of each test is fixed with ``@settings(max_examples=N)`` and listed in
docs/fuzzing.md. The regression corpus (tests/corpus/) is replayed by ``test_corpus_replay``:
one or more files per parser, each named ``<parser>-<what>.bin``.

Run the suite alone with ``pytest -m badinput``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.discovery.dht import MAX_VALUE, parse_record, parse_value
from mesh.discovery.dhtwire import REQUEST, open_datagram, parse_answer
from mesh.discovery.dhtwire import parse_request as parse_request_dht
from mesh.discovery.mdns import parse_announcement
from mesh.discovery.mqtt import MqttConfig, MqttSignaling
from mesh.errors import (
    EXPECTED,
    DiscoveryError,
    HandshakeError,
    PeerUnavailable,
    SignalingError,
    WireError,
)
from mesh.inference.compute import ComputeConfig, ComputeService, models_of
from mesh.inference.prompts import tokens_of
from mesh.inference.sampling import SamplingParams
from mesh.jobs.service import JobError, parse_records
from mesh.net.handshake import fingerprint_from_sdp, parse_hello, parse_proof
from mesh.net.identity import Identity
from mesh.net.rpc import CallContext, Link, Reply
from mesh.net.signaling import ReplayGuard, clean_endpoints, parse_endpoint, parse_envelope, seal
from mesh.net.view import NetViewError, parse_info
from mesh.net.wire import Encoder, Reassembler
from mesh.storage.fastpath import FastPathError, parse_request
from mesh.storage.service import ObjectService, StorageConfig
from mesh.storage.store import StoreError, parse_manifest
from runtimes.errors import ModelError
from runtimes.shards import Manifest

from .memchannel import pair
from .strategies import ANY

pytestmark = pytest.mark.badinput

CORPUS = Path(__file__).parent / "corpus"
ME = Identity.generate()
PEER = Identity.generate()
HEX = "ab" * 32


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def msgpack_or_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), ANY.map(lambda o: bytes(msgpack.packb(o))))


# -- handshake SDP fingerprints -----------------------------------------------------------
FP = ":".join(["AB"] * 32)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(
            st.sampled_from(
                [f"a=fingerprint:sha-256 {FP}", "a=fingerprint:sha-256 ZZ", "v=0", "\r\n", "\n"]
            ),
            max_size=6,
        ).map("\n".join),
    )
)
def test_fuzz_sdp_fingerprint(sdp: str) -> None:
    try:
        fingerprint_from_sdp(sdp)
    except HandshakeError:
        pass


# -- signaling endpoints (addresses peers advertise) -----------------------------------------
@settings(max_examples=300, deadline=None)
@given(ANY)
def test_fuzz_signaling_endpoints(value: Any) -> None:
    """Neither raises: a bad endpoint is None, a bad list filtered."""
    got = parse_endpoint(value)
    assert got is None or (isinstance(got[0], str) and 0 < got[1] < 65536)
    assert all(isinstance(e, str) for e in clean_endpoints(value))


# -- DHT records one by one ---------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.one_of(msgpack_or_bytes(), ANY))
def test_fuzz_dht_record(raw: Any) -> None:
    try:
        parse_record(raw)
    except DiscoveryError:
        pass
    records, bad = parse_value(raw)
    assert records == [] and bad >= 1 or all(r.raw for r in records)


# -- MQTT presence and inbox payloads -------------------------------------------------------
def _mqtt(key: bytes | None) -> MqttSignaling:
    async def on_offer(env: Any) -> bytes:
        return b""

    return MqttSignaling(
        ME,
        MqttConfig(url="mqtt://127.0.0.1:1", mesh="m", mesh_key=key),
        on_offer=on_offer,
        on_presence=lambda pid, body: None,
        on_absence=lambda pid: None,
        presence_body=dict,
        guard=ReplayGuard(),
    )


def _mqtt_inputs() -> st.SearchStrategy[bytes]:
    good = seal(PEER, "presence", "*", {"sig": "x"})
    return st.one_of(
        msgpack_or_bytes(),
        st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
            lambda t: good[: t[0]] + bytes([t[1]]) + good[t[0] + 1 :]
        ),
        st.integers(0, len(good)).map(lambda n: good[:n]),
        st.binary(min_size=40, max_size=200),  # sealed-looking garbage
    )


@settings(max_examples=300, deadline=None)
@given(_mqtt_inputs(), st.booleans(), st.booleans())
def test_fuzz_mqtt_presence_and_inbox(payload: bytes, sealed: bool, inbox: bool) -> None:
    sig = _mqtt(bytes(32) if sealed else None)

    async def body() -> None:
        try:
            if inbox:
                sig._handle_inbox(payload)
            else:
                sig._handle_presence(PEER.peer_id, payload)
        except SignalingError:
            pass

    run(body())


# -- fast-path requests ---------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        msgpack_or_bytes(),
        st.fixed_dictionaries({"blob": ANY, "off": ANY, "len": ANY}, optional={"sha": ANY}).map(
            lambda d: bytes(msgpack.packb(d))
        ),
        st.fixed_dictionaries({"sha": ANY}).map(lambda d: bytes(msgpack.packb(d))),
    )
)
def test_fuzz_fastpath_request(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except FastPathError:
        return
    assert set(req) in ({"sha"}, {"blob", "off", "len"})


# -- peer info (net_info), sampling parameters, job records, models listings ----------------
@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["zone", "price", "speed", "fast", "coord", "compute", "x"]),
        st.one_of(ANY, st.lists(st.floats(), min_size=5, max_size=5)),
        max_size=7,
    )
)
def test_fuzz_net_info(params: dict[str, Any]) -> None:
    try:
        info = parse_info(params)
    except NetViewError:
        return
    assert math.isfinite(info.egress_price) and math.isfinite(info.speed)


@settings(max_examples=200, deadline=None)
@given(ANY)
def test_fuzz_sampling_params(value: Any) -> None:
    try:
        SamplingParams.from_wire(value)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(ANY.map(lambda o: json.dumps(o, default=str)), max_size=4).map(
            lambda rows: "\n".join(rows).encode()
        ),
        st.lists(
            st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)), max_size=4),
            max_size=4,
        ).map(lambda rows: "\n".join(json.dumps({"x": r}) for r in rows).encode()),
    )
)
def test_fuzz_job_records(data: bytes) -> None:
    try:
        x = parse_records(data)
    except JobError:
        return
    assert x.dtype == np.float32 and x.ndim == 2 and bool(np.all(np.isfinite(x)))


@pytest.mark.parametrize("x", ["[1e300]", "[NaN]", "[-Infinity]", "[[1]]", "[[1, 2], [3, 4]]"])
def test_job_records_refuse_values_that_are_not_finite_float32(x: str) -> None:
    with pytest.raises(JobError):
        parse_records(b'{"x": %s}' % x.encode())


@settings(max_examples=200, deadline=None)
@given(msgpack_or_bytes())
def test_fuzz_models_listing(payload: bytes) -> None:
    """A ``models`` reply from a peer: never raises, always a list of maps."""
    assert all(isinstance(m, dict) for m in models_of(Reply({}, payload)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.one_of(ANY, st.integers(-2, 20)))
def test_fuzz_tokenize_reply(payload: bytes, n: Any) -> None:
    """A ``tokenize`` reply from a peer: non-negative int32 ids, as many as it says, or
    ModelError."""
    try:
        tokens = tokens_of(Reply({"n": n}, payload))
    except ModelError:
        return
    assert len(tokens) == n == len(payload) // 4 and all(t >= 0 for t in tokens)


def test_tokenize_reply_over_the_cap_is_refused_before_decoding() -> None:
    big = bytes(4 * ((1 << 20) + 2))
    with pytest.raises(ModelError):
        tokens_of(Reply({"n": len(big) // 4}, big))


# -- RPC framing on a link -------------------------------------------------------------------
HEADERS = st.dictionaries(
    st.sampled_from(["t", "id", "m", "d", "p", "r", "c", "e", "n", "o", "why"]),
    st.one_of(
        ANY,
        st.sampled_from(["req", "res", "err", "cancel", "ping", "pong", "bye", "echo"]),
        st.integers(-2, 5),
    ),
    max_size=7,
)


class _Echo:
    async def rpc_echo(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        return Reply({"n": len(payload)}, payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(HEADERS, st.binary(max_size=64)), min_size=1, max_size=6))
def test_fuzz_rpc_messages(messages: list[tuple[dict[str, Any], bytes]]) -> None:
    """Whatever well-framed headers a peer sends, ``Link.feed`` raises nothing: the link
    answers, ignores, or closes itself with a protocol error."""

    async def body() -> None:
        ca, cb = pair()
        link = Link(ca, "p" * 32, b"", {"echo": _Echo().rpc_echo})
        ca.link = link
        enc = Encoder()
        for header, payload in messages:
            try:
                frames = enc.encode(header, payload)
            except WireError:
                continue
            for frame in frames:
                link.feed(frame)
        await asyncio.sleep(0)  # let handlers started by the messages run once
        link.close("test over", notify=False)
        if link.close_reason and link.close_reason.startswith("protocol error"):
            assert link.closed.is_set()

    run(body())


# -- RPC handlers that take peer data ------------------------------------------------------
class _FakeNode:
    def __init__(self) -> None:
        self.identity = ME
        self.me = ME.peer_id
        self.dht = None
        self.banned: dict[str, str] = {}
        self.config = SimpleNamespace(signaling_host="127.0.0.1", api_host="127.0.0.1")

    def connected_peer_ids(self) -> list[str]:
        return []

    async def call(self, peer: str, method: str, *a: Any, **k: Any) -> Reply:
        raise PeerUnavailable(f"no link to {peer[:12]} in this test")

    async def notify(self, peer: str, method: str, *a: Any, **k: Any) -> None:
        return None


_SERVICES: dict[str, Any] = {}


def _services(root: Path) -> dict[str, Any]:
    if "compute" not in _SERVICES:
        node = _FakeNode()
        compute = ComputeService(node, ME.peer_id, root / "c", ComputeConfig(runtime="fake"))
        objects = ObjectService(node, StorageConfig(fast_path=False), root / "o")  # type: ignore[arg-type]
        _SERVICES.update(
            compute=compute,
            objects=objects,
        )
    return _SERVICES


def _handlers(root: Path) -> dict[str, Callable[..., Any]]:
    s = _services(root)
    c, o = s["compute"], s["objects"]
    return {
        "stage_open": c.rpc_stage_open,
        "stage_close": c.rpc_stage_close,
        "stage_push": c.rpc_stage_push,
        "stage_forward": c.rpc_stage_forward,
        "tokenize": c.tokenizers.rpc_tokenize,
        "manifest": c.rpc_manifest,
        "obj_manifest": o.rpc_obj_manifest,
        "chunk_read": o.rpc_chunk_read,
        "chunk_has": o.rpc_chunk_has,
        "obj_replicate": o.rpc_obj_replicate,
        "obj_announce": o.providers.rpc_obj_announce,
        "obj_sync": o.providers.rpc_obj_sync,
        "net_info": o.net.rpc_net_info,
    }


HANDLER_NAMES = sorted(
    [
        "stage_open",
        "stage_close",
        "stage_push",
        "stage_forward",
        "tokenize",
        "manifest",
        "obj_manifest",
        "chunk_read",
        "chunk_has",
        "obj_replicate",
        "obj_announce",
        "obj_sync",
        "net_info",
    ]
)
PARAM_KEYS = [
    "sid",
    "model_id",
    "units",
    "runtime",
    "max_tokens",
    "next",
    "next_sid",
    "prev",
    "n",
    "pos",
    "rid",
    "sample",
    "top",
    "trace",
    "text",
    "id",
    "replicas",
    "sha",
    "shas",
    "sha256",
    "offset",
    "length",
    "zone",
    "price",
]
PARAMS = st.dictionaries(
    st.sampled_from(PARAM_KEYS),
    st.one_of(
        ANY,
        st.just(HEX),
        st.just("0123456789abcdef"),
        st.lists(st.integers(-2, 8), min_size=2, max_size=2),
        st.lists(st.just(HEX), max_size=3),
    ),
    max_size=8,
)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.sampled_from(HANDLER_NAMES), PARAMS, msgpack_or_bytes())
def test_fuzz_rpc_handlers(
    tmp_path_factory: pytest.TempPathFactory, name: str, params: dict[str, Any], payload: bytes
) -> None:
    """Each ``rpc_*`` handler that takes a peer's params and payload raises only the
    errors edgemesh raises on purpose (:data:`mesh.errors.EXPECTED`: mesh's, the runtimes' and
    the scheduler's roots; the link turns them into ``err`` replies; anything else would be
    logged as an internal error)."""
    root = _SERVICES.get("root") or tmp_path_factory.mktemp("handlers")
    _SERVICES.setdefault("root", root)
    handler = _handlers(root)[name]
    ctx = CallContext(None, name, 1e18, PEER.peer_id)

    async def body() -> None:
        try:
            await asyncio.wait_for(handler(ctx, params, payload), 5)
        except EXPECTED:
            pass

    run(body())


# -- the regression corpus: one or more files per parser -----------------------------------
def _replay_frame(data: bytes) -> None:
    Reassembler().feed(data)


def _replay_handshake(data: bytes) -> None:
    header = msgpack.unpackb(data, raw=False)
    try:
        parse_hello(header)
    except HandshakeError:
        parse_proof(header)


def _replay_mdns(data: bytes) -> None:
    props = {k.encode(): v for k, v in msgpack.unpackb(data, raw=False).items()}
    parse_announcement(props, f"{ME.peer_id}._edgemesh._tcp.local.")


def _replay_dht(data: bytes) -> None:
    parse_record(data)


def _replay_dht_datagram(data: bytes) -> None:
    dg = open_datagram(data, MAX_VALUE)
    if dg.kind == REQUEST:
        parse_request_dht(dg)
    else:
        parse_answer("find_node", dg)


def _replay_mqtt(data: bytes) -> None:
    _mqtt(None)._handle_presence(PEER.peer_id, data)


def _replay_rpc(data: bytes) -> None:
    """A frame whose header a link refuses: the link closes with a protocol error, which
    is reported here as the WireError it stands for (feed itself never raises)."""

    async def body() -> str | None:
        ca, _ = pair()
        link = Link(ca, "p" * 32, b"", {})
        ca.link = link
        link.feed(data)
        reason = link.close_reason
        link.close("test over", notify=False)
        return reason

    reason = run(body())
    assert reason is not None, "the link accepted a malformed message"
    if "protocol error" in reason:
        raise WireError(reason)


def _replay_tokens(data: bytes) -> None:
    tokens_of(Reply({"n": len(data) // 4}, data))


# parser prefix of a corpus file -> (replay function, the error class it must raise)
REPLAY: dict[str, tuple[Callable[[bytes], None], type[Exception]]] = {
    "frame": (_replay_frame, WireError),
    "signaling": (parse_envelope, SignalingError),
    "handshake": (_replay_handshake, HandshakeError),
    "mdns": (_replay_mdns, DiscoveryError),
    "dht": (_replay_dht, DiscoveryError),
    "dhtdatagram": (_replay_dht_datagram, DiscoveryError),
    "mqtt": (_replay_mqtt, SignalingError),
    "manifest": (parse_manifest, StoreError),
    "modelmanifest": (Manifest.from_json, ModelError),
    "fastpath": (parse_request, FastPathError),
    "jobrecords": (parse_records, JobError),
    "rpc": (_replay_rpc, WireError),
    "tokens": (_replay_tokens, ModelError),
}


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus_replay(path: Path) -> None:
    """Inputs that once mattered; each is refused with its parser's own error."""
    parser = path.name.split("-", 1)[0]
    assert parser in REPLAY, f"corpus file {path.name} names no known parser"
    replay, error = REPLAY[parser]
    with pytest.raises(error):
        replay(path.read_bytes())


def test_corpus_covers_every_parser() -> None:
    have = {p.name.split("-", 1)[0] for p in CORPUS.glob("*.bin")}
    assert set(REPLAY) <= have, f"no corpus file for {sorted(set(REPLAY) - have)}"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"top_k": float("inf")}, "sampling"),  # int(Infinity): an OverflowError, a 500
        ({"tokens": [1, 2**40]}, "tokens"),  # past every vocabulary and the wire's int32
        ({"tokens": [-1]}, "tokens"),
    ],
)
def test_generation_bodies_out_of_range_are_400s(body: dict[str, Any], match: str) -> None:
    from mesh.api.errors import ApiError
    from mesh.api.generate import parse_generation

    with pytest.raises(ApiError, match=match) as raised:
        parse_generation({"model": "m", **body})
    assert raised.value.status == 400
