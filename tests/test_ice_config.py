"""ICE server configuration: URLs, credentials from the ICE config file or the environment,
never from argv; whatever aiortc would skip without a word is refused before a node starts."""

import json
import os
import subprocess
import sys

import pytest

from mesh.cli.common import CliError
from mesh.cli.main import _parser as build_parser
from mesh.cli.node import node_config
from mesh.errors import Error
from mesh.net.ice import IceConfigError, IceServer, load_ice_file, parse_url, resolve_ice_servers
from mesh.net.transport import TransportConfig

ENV = {"EDGEMESH_TURN_USERNAME": "alice", "EDGEMESH_TURN_CREDENTIAL": "s3cret"}


def resolve(urls, config_file=None, default_file=None, env=None):
    return resolve_ice_servers(
        urls, config_file=config_file, default_file=default_file, env=env or {}
    )


@pytest.mark.parametrize(
    "url, scheme, port, transport",
    [
        ("stun:stun.example.org", "stun", 3478, None),
        ("stun:198.51.100.7:19302", "stun", 19302, None),
        ("turn:turn.example.org", "turn", 3478, "udp"),
        ("turn:turn.example.org:3479?transport=tcp", "turn", 3479, "tcp"),
        ("turns:turn.example.org", "turns", 5349, "tcp"),
    ],
)
def test_urls_aiortc_uses_parse(url, scheme, port, transport):
    parsed = parse_url(url)
    assert (parsed["scheme"], parsed["port"], parsed.get("transport")) == (scheme, port, transport)


@pytest.mark.parametrize(
    "url, why",
    [
        ("stun.example.org", "malformed"),
        ("http://turn.example.org", "invalid scheme"),
        ("turn:host:port", "malformed"),
        ("turn:host:3478?transport=sctp", "udp or tcp"),
        ("turns:host?transport=udp", "TCP only"),
        ("stuns:host", "not supported"),
        ("stun:host?transport=udp", "must not contain transport"),
        ("turn:host:70000", "out of range"),
    ],
)
def test_urls_aiortc_would_skip_are_refused(url, why):
    with pytest.raises(IceConfigError, match=why) as err:
        parse_url(url)
    assert isinstance(err.value, Error)


def test_a_credential_in_a_url_is_refused_and_never_echoed():
    with pytest.raises(IceConfigError) as err:
        resolve(["turn:alice:s3cret@turn.example.org:3478"])
    message = str(err.value)
    assert "s3cret" not in message and "alice" not in message
    assert "turn.example.org:3478" in message
    assert "ice.json" in message and "EDGEMESH_TURN_CREDENTIAL" in message


def test_turn_without_credentials_is_refused_and_says_where_to_put_them():
    with pytest.raises(IceConfigError, match="no username and credential.*EDGEMESH_TURN"):
        resolve(["turn:turn.example.org"])


def test_environment_credentials_apply_to_turn_urls_only():
    servers = resolve(["stun:stun.example.org", "turn:turn.example.org?transport=tcp"], env=ENV)
    assert servers == (
        IceServer("stun:stun.example.org"),
        IceServer("turn:turn.example.org?transport=tcp", "alice", "s3cret"),
    )
    assert "s3cret" not in repr(servers)
    rtc = TransportConfig(ice_servers=servers).rtc_configuration().iceServers
    assert [(s.urls, s.username, s.credential) for s in rtc] == [
        ("stun:stun.example.org", None, None),
        ("turn:turn.example.org?transport=tcp", "alice", "s3cret"),
    ]


def test_half_the_environment_is_refused():
    with pytest.raises(IceConfigError, match="both"):
        resolve(["turn:h"], env={"EDGEMESH_TURN_USERNAME": "alice"})


def test_config_file_servers_with_credentials(tmp_path):
    path = tmp_path / "ice.json"
    path.write_text(
        json.dumps(
            [
                {"urls": "stun:stun.example.org"},
                {"urls": ["turns:turn.example.org:443"], "username": "u", "credential": "c"},
            ]
        )
    )
    path.chmod(0o600)
    assert resolve([], default_file=path) == (
        IceServer("stun:stun.example.org"),
        IceServer("turns:turn.example.org:443", "u", "c"),
    )
    # The file's own credentials win over the environment's.
    assert resolve([], config_file=path, env=ENV)[1].username == "u"


def test_a_missing_default_file_is_fine_a_missing_given_file_is_not(tmp_path):
    assert resolve(["stun:s"], default_file=tmp_path / "ice.json") == (IceServer("stun:s"),)
    with pytest.raises(IceConfigError, match="ice.json"):
        resolve([], config_file=tmp_path / "ice.json")


@pytest.mark.parametrize(
    "content, why",
    [
        ("{", "not JSON"),
        ('{"urls": "stun:s"}', "JSON list"),
        ('["stun:s"]', "expected an object"),
        ('[{"url": "stun:s"}]', "unknown keys"),
        ('[{"urls": []}]', "non-empty list"),
        ('[{"urls": "turn:h", "username": 5, "credential": "c"}]', "username must be a string"),
        ('[{"urls": "turn:h", "credentialType": "oauth"}]', "password"),
        ('[{"urls": "stun:s", "username": "u", "credential": "c"}]', "no credentials"),
        ('[{"urls": "turn:u:p@h", "username": "u", "credential": "c"}]', "refused"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, content, why):
    path = tmp_path / "ice.json"
    path.write_text(content)
    with pytest.raises(IceConfigError, match=why):
        resolve([], config_file=path)


def test_a_second_stun_or_turn_server_is_refused_not_ignored():
    with pytest.raises(IceConfigError, match="one STUN server"):
        resolve(["stun:a", "stun:b"])
    with pytest.raises(IceConfigError, match="one TURN server"):
        resolve(["turn:a", "turn:a?transport=tcp"], env=ENV)


def test_transport_config_checks_what_it_is_given():
    with pytest.raises(IceConfigError, match="refused"):
        TransportConfig(ice_servers=("turn:u:p@host",))
    with pytest.raises(IceConfigError, match="relay-only"):
        TransportConfig(ice_servers=("stun:s",), relay_only=True)
    relay = TransportConfig(ice_servers=(IceServer("turn:h", "u", "c"),), relay_only=True)
    assert relay.rtc_configuration().iceTransportPolicy.value == "relay"


def test_world_readable_credentials_are_warned_about(tmp_path, caplog):
    path = tmp_path / "ice.json"
    path.write_text('[{"urls": "turn:h", "username": "u", "credential": "c"}]')
    path.chmod(0o644)
    load_ice_file(path)
    assert "readable by others" in caplog.text


def test_cli_reads_the_data_dirs_ice_json_and_the_environment(tmp_path, monkeypatch):
    (tmp_path / "ice.json").write_text('[{"urls": "turn:relay.example.org"}]')
    monkeypatch.setenv("EDGEMESH_TURN_USERNAME", "alice")
    monkeypatch.setenv("EDGEMESH_TURN_CREDENTIAL", "s3cret")
    args = build_parser().parse_args(
        ["node", "--data-dir", str(tmp_path), "--stun", "stun:s", "--ice-relay-only"]
    )
    transport = node_config(args).transport
    assert transport.relay_only
    assert transport.servers == (
        IceServer("stun:s"),
        IceServer("turn:relay.example.org", "alice", "s3cret"),
    )
    monkeypatch.delenv("EDGEMESH_TURN_CREDENTIAL")
    with pytest.raises(CliError, match="both"):
        node_config(args)


def test_a_node_with_a_credential_on_argv_does_not_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMESH_TURN")}
    proc = subprocess.run(
        [sys.executable, "-m", "mesh.cli.main", "node", "--data-dir", str(tmp_path)]
        + ["--no-mdns", "--api", "127.0.0.1:0", "--stun", "turn:bob:hunter2@127.0.0.1:3478"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr  # the CLI's error exit, before any start-up
    assert "credentials in a URL are refused" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert not proc.stdout  # never ready
