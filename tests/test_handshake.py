import pytest

from mesh.errors import HandshakeError
from mesh.net.handshake import HandshakeState, fingerprint_from_sdp, parse_hello
from mesh.net.identity import Identity

FP_A = ":".join(["AA"] * 32)
FP_B = ":".join(["BB"] * 32)
FP_M = ":".join(["CC"] * 32)


def states(a=None, b=None, a_remote=FP_B, b_remote=FP_A):
    a, b = a or Identity.generate(), b or Identity.generate()
    sa = HandshakeState(a, offerer=True, local_fp=FP_A, remote_fp=a_remote, expected_peer=b.peer_id)
    sb = HandshakeState(
        b, offerer=False, local_fp=FP_B, remote_fp=b_remote, expected_peer=a.peer_id
    )
    return sa, sb


def run(sa, sb):
    proof_a = sa.receive_hello(sb.hello())
    proof_b = sb.receive_hello(sa.hello())
    return sa.receive_proof(proof_b), sb.receive_proof(proof_a)


def test_honest_handshake():
    sa, sb = states()
    ra, rb = run(sa, sb)
    assert ra.peer_id == sb.identity.peer_id and rb.peer_id == sa.identity.peer_id


def test_mitm_fingerprints_do_not_verify():
    # each side saw the relay's certificate instead of the other's
    sa, sb = states(a_remote=FP_M, b_remote=FP_M.replace("CC", "DD"))
    proof_a = sa.receive_hello(sb.hello())
    proof_b = sb.receive_hello(sa.hello())
    with pytest.raises(HandshakeError, match="DTLS fingerprints"):
        sa.receive_proof(proof_b)
    with pytest.raises(HandshakeError, match="DTLS fingerprints"):
        sb.receive_proof(proof_a)


def test_wrong_expected_peer():
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    sa = HandshakeState(a, offerer=True, local_fp=FP_A, remote_fp=FP_B, expected_peer=c.peer_id)
    sb = HandshakeState(b, offerer=False, local_fp=FP_B, remote_fp=FP_A)
    with pytest.raises(HandshakeError, match="expected peer"):
        sa.receive_hello(sb.hello())


def test_reflected_proof_fails():
    sa, sb = states()
    proof_a = sa.receive_hello(sb.hello())
    sb.receive_hello(sa.hello())
    # b's own... a proof signed in the offerer role cannot pass as the answerer's
    with pytest.raises(HandshakeError):
        sa.receive_proof(proof_a)


def test_hello_claiming_another_id():
    a, b = Identity.generate(), Identity.generate()
    hello = HandshakeState(a, offerer=True, local_fp=FP_A, remote_fp=FP_B).hello()
    hello["id"] = b.peer_id
    with pytest.raises(HandshakeError, match="does not match its public key"):
        parse_hello(hello)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.update(t="proof"),
        lambda h: h.update(v=2),
        lambda h: h.update(pk=b"x" * 31),
        lambda h: h.update(nonce=b"short"),
        lambda h: h.pop("id"),
        lambda h: h.update(pk="not bytes"),
    ],
)
def test_malformed_hello(mutate):
    hello = HandshakeState(Identity.generate(), offerer=True, local_fp=FP_A, remote_fp=FP_B).hello()
    mutate(hello)
    with pytest.raises(HandshakeError):
        parse_hello(hello)


def test_proof_before_hello_and_malformed_proof():
    sa, sb = states()
    with pytest.raises(HandshakeError, match="before hello"):
        sa.receive_proof({"t": "proof", "sig": b"x" * 64})
    sa.receive_hello(sb.hello())
    with pytest.raises(HandshakeError, match="64-byte"):
        sa.receive_proof({"t": "proof", "sig": b"x"})


def test_fingerprint_from_sdp():
    sdp = f"v=0\r\na=fingerprint:sha-256 {FP_A.lower()}\r\na=fingerprint:sha-384 00\r\n"
    assert fingerprint_from_sdp(sdp) == FP_A
    with pytest.raises(HandshakeError):
        fingerprint_from_sdp("v=0\r\n")
    with pytest.raises(HandshakeError):
        fingerprint_from_sdp(sdp + f"a=fingerprint:sha-256 {FP_B}\r\n")


def test_equal_fingerprints_refused():
    with pytest.raises(HandshakeError):
        HandshakeState(Identity.generate(), offerer=True, local_fp=FP_A, remote_fp=FP_A)
