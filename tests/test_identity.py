import os
import stat

import pytest

from mesh.errors import IdentityError
from mesh.net.identity import KEY_FILE_NAME, Identity, peer_id_from_key, verify


def test_key_file_created_0600_and_stable(tmp_path):
    a = Identity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = Identity.load_or_create(tmp_path)
    assert a.peer_id == b.peer_id and a.public_key == b.public_key


def test_peer_id_encoding():
    ident = Identity.generate()
    pid = ident.peer_id
    assert len(pid) == 32 and pid == pid.lower() and pid.isalnum()
    assert peer_id_from_key(ident.public_key) == pid
    assert Identity.generate().peer_id != pid


def test_sign_verify_and_tamper():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    verify(ident.public_key, b"hello", sig)
    with pytest.raises(IdentityError):
        verify(ident.public_key, b"hellO", sig)
    with pytest.raises(IdentityError):
        verify(Identity.generate().public_key, b"hello", sig)
    with pytest.raises(IdentityError):
        verify(ident.public_key, b"hello", sig[:-1])


def test_refuses_world_readable_key(tmp_path):
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        Identity.load_or_create(tmp_path)


def test_refuses_malformed_key(tmp_path):
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="32-byte"):
        Identity.load_or_create(tmp_path)
