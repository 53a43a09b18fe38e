"""Every parser that takes bytes from the network, fuzzed: nothing escapes but its own error.

(The frame parser, signaling envelopes and DHT values have their own fuzz tests in
test_wire.py, test_signaling.py and test_dht.py.) Regression inputs live in tests/corpus/.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.discovery.mdns import make_properties, parse_announcement
from mesh.errors import DiscoveryError, Error, HandshakeError
from mesh.net.handshake import parse_hello, parse_proof
from mesh.net.identity import Identity
from mesh.storage.store import StoreError, build_manifest, parse_manifest, sha256
from runtimes.errors import ModelError
from runtimes.gguf_io import open_gguf
from runtimes.shards import Manifest

from .strategies import ANY

pytestmark = pytest.mark.badinput
CORPUS = Path(__file__).parent / "corpus"


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["t", "v", "id", "pk", "nonce", "sig", "x"]), ANY, max_size=6)
)
def test_fuzz_handshake_messages(header):
    for parse in (parse_hello, parse_proof):
        try:
            parse(header)
        except HandshakeError:
            pass


ME = Identity.generate()
GOOD_TXT = {
    k.encode(): v.encode() for k, v in make_properties(ME, 4000, ["10.0.0.2"], "n", "m").items()
}


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"id", b"pk", b"sp", b"a", b"n", b"m", b"t", b"sig"]),
        st.one_of(st.none(), st.binary(max_size=120)),
        max_size=8,
    ),
    st.booleans(),
)
def test_fuzz_mdns_txt(props, merge):
    txt = {**GOOD_TXT, **props} if merge else props
    try:
        parse_announcement(txt, f"{ME.peer_id}._edgemesh._tcp.local.")
    except DiscoveryError:
        pass


def _manifest_inputs():
    good = build_manifest([(sha256(b"a" * 10), 10), (sha256(b"b" * 5), 5)], "x").raw
    return st.one_of(
        st.binary(max_size=400),
        st.integers(0, len(good)).map(lambda n: good[:n]),
        st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
            lambda t: good[: t[0]] + bytes([t[1]]) + good[t[0] + 1 :]
        ),
        ANY.map(lambda obj: msgpack.packb(obj)),
        ANY.map(lambda obj: json.dumps(obj, default=str).encode()),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifest_inputs())
def test_fuzz_object_manifests(raw):
    try:
        parse_manifest(raw)
    except StoreError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), ANY.map(lambda o: json.dumps(o, default=str).encode())))
def test_fuzz_model_manifests(raw):
    try:
        Manifest.from_json(raw)
    except ModelError:
        pass


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    from runtimes.testmodels import write_test_model

    path = write_test_model(tmp_path_factory.mktemp("fz") / "m.gguf", "llama")
    return path.read_bytes()[:4096]  # the header and metadata region


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_gguf_headers(gguf_bytes, tmp_path_factory, data):
    """A shard blob from a peer is hash-checked first, but the parser must hold up anyway."""
    cut = data.draw(st.integers(0, len(gguf_bytes)))
    pos = data.draw(st.integers(0, len(gguf_bytes) - 1))
    val = data.draw(st.integers(0, 255))
    raw = bytearray(gguf_bytes[:cut] if data.draw(st.booleans()) else gguf_bytes)
    if pos < len(raw):
        raw[pos] = val
    path = tmp_path_factory.mktemp("g") / "x.gguf"
    path.write_bytes(bytes(raw))
    try:
        open_gguf(path)
    except (ModelError, Error):
        pass


@pytest.mark.parametrize("path", sorted(CORPUS.glob("frame-*.bin")), ids=lambda p: p.name)
def test_regression_corpus(path):
    """Inputs that once mattered; each must be refused with the parser's own error."""
    from mesh.errors import WireError
    from mesh.net.wire import Reassembler

    data = path.read_bytes()
    with pytest.raises(WireError):
        Reassembler().feed(data)
