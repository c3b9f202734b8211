"""Real processes over TLS on loopback: ``twistd -n evserver``, ``ev-encoder``, ``ev-viewer``.

One server (module fixture) serves every test but the demo, which runs its
own.  Video is real H.264 (``--source testsrc``) checked by PyAV.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evserver.media import decode_file
from tests.realproc import (
    ServerProcess,
    child_env,
    provision,
    requires_evserver,
    run_tool,
    spawn_tool,
    stop_process,
    tool_command,
)

pytestmark = [pytest.mark.real, requires_evserver]

DOMAINS: dict[str, dict[str, Any]] = {
    "north": {"accounts": {"alice": "alice-pw"}, "encoders": ["cam1", "cam2"]},
    "south": {"accounts": {"carol": "carol-pw"}, "encoders": ["cam9"]},
}


class World:
    def __init__(self, server: ServerProcess, secrets: dict[str, str]) -> None:
        self.server = server
        self.secrets = secrets

    def encoder_args(self, *args: str) -> list[str]:
        return ["--server", self.server.address("encoder"), "--ca", str(self.server.ca_path),
                *args]

    def viewer_args(self, account: str, *args: str) -> list[str]:
        password = DOMAINS["north" if account == "alice" else "south"]["accounts"][account]
        return ["--server", self.server.address("viewer"), "--ca", str(self.server.ca_path),
                "--account", account, "--password", password, *args]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("server") / "data"
    secrets = provision(data, DOMAINS)
    server = ServerProcess(data)  # TLS, the default
    server.start()
    try:
        yield World(server, secrets)
    finally:
        status = server.stop()
        log = server.log_text()
        assert "Traceback" not in log, log
        # twistd ends a SIGTERM'd run by re-raising the signal once shut down cleanly.
        assert status in (0, -15), log


def test_encoder_to_viewer_real_h264(world: World, tmp_path: Path) -> None:
    encoder = spawn_tool("encoder", world.encoder_args(
        "--id", "cam1", f"--secret={world.secrets['cam1']}", "--source", "testsrc",
        "--duration", "45", "--json"), stderr=subprocess.PIPE)
    out = tmp_path / "cam1.h264"
    try:
        viewer = run_tool("viewer", world.viewer_args(
            "alice", "--watch", "cam1", "--out", str(out), "--decode", "--frames", "100",
            "--duration", "30", "--json"))
    finally:
        encoder_status = stop_process(encoder)
        encoder_out, encoder_err = encoder.communicate()
    assert viewer.status == 0, viewer
    report = viewer.json()
    assert report["frames"] >= 100
    assert report["decode_errors"] == 0
    assert report["decoded_frames"] >= 99  # the decoder may hold the very last one
    assert report["gaps"] == 0
    assert report["keyframes"] >= 1
    assert report["encoders"]["cam1"]["size"] == "640x360"
    assert report["out"]["frames"] >= 100
    assert 0 <= report["latency_p50_ms"] < 1000
    frames, errors = decode_file(out)
    assert frames >= 100 and errors == 0
    # The encoder was stopped by SIGTERM and reports what it sent.
    assert encoder_status == 0, encoder_err
    sent = json.loads(encoder_out.decode().strip().splitlines()[-1])
    assert sent["per_encoder"]["cam1"]["frames"] >= 100
    assert sent["starts"] >= 1 and sent["failed"] == 0


def test_wrong_secret_is_refused(world: World) -> None:
    result = run_tool("encoder", world.encoder_args(
        "--id", "cam1", "--secret", "not-the-secret-of-cam1", "--duration", "20"))
    assert result.status == 1
    assert result.error_lines() == [
        "ev-encoder: error: encoder 'cam1': refused by the server: unknown encoder or "
        "wrong secret (AUTH_FAILED)"], result.stderr


def test_wrong_password_is_refused(world: World) -> None:
    result = run_tool("viewer", [
        "--server", world.server.address("viewer"), "--ca", str(world.server.ca_path),
        "--account", "alice", "--password", "wrong", "--list"])
    assert result.status == 1
    assert result.error_lines() == [
        "ev-viewer: error: login as 'alice': refused by the server: unknown account or "
        "wrong password (AUTH_FAILED)"], result.stderr


def test_viewer_of_another_domain_is_refused(world: World) -> None:
    encoder = spawn_tool("encoder", world.encoder_args(
        "--id", "cam9", f"--secret={world.secrets['cam9']}", "--duration", "30"))
    try:
        result = run_tool("viewer", world.viewer_args(
            "alice", "--watch", "cam9", "--frames", "10", "--duration", "15", "--json"))
    finally:
        stop_process(encoder)
    assert result.status == 1
    assert result.error_lines() == [
        "ev-viewer: error: cannot watch 'cam9': no encoder 'cam9' (NOT_FOUND)"], result.stderr


def test_list_shows_only_own_domain(world: World) -> None:
    result = run_tool("viewer", world.viewer_args("alice", "--list", "--json"))
    assert result.status == 0, result
    listing = result.json()
    assert listing["domain"] == "north"
    assert [e["id"] for e in listing["encoders"]] == ["cam1", "cam2"]
    table = run_tool("viewer", world.viewer_args("carol", "--list"))
    assert table.status == 0
    assert table.stdout.splitlines()[0].split() == ["ID", "NAME", "STATE", "SERVER"]
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == ["cam9"]


def test_untrusted_certificate_is_explained(world: World) -> None:
    # Without --ca the system's authorities are trusted, and the self-signed
    # certificate of the server is not.
    result = run_tool("viewer", ["--server", world.server.address("viewer"),
                                 "--account", "alice", "--password", "alice-pw", "--list"])
    assert result.status == 1
    [line] = result.error_lines()
    assert "certificate verify failed" in line and "--ca" in line


def test_demo_runs_and_stops(tmp_path: Path) -> None:
    # A cluster of three servers; two encoders, so on two different servers.
    done = subprocess.run(tool_command("demo", "--duration", "8", "--encoders", "2",
                                       "--size", "320x180", "--stats-interval", "3",
                                       "--data", str(tmp_path / "demo")),
                          capture_output=True, text=True, timeout=90, env=child_env(),
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    out = done.stdout
    assert "evserver demo is running: a cluster of 3 servers" in out
    assert "--account demo --password demo --watch cam1 --out cam1.h264" in out
    stats = [line for line in out.splitlines() if line.startswith("[viewer] ev-viewer:")]
    assert stats and "cam1" in stats[-1] and "cam2" in stats[-1]
    assert "with 0 decode errors" in out
    assert "video came from 2 server(s): s1, s2" in out
    for name in ("s1", "s2", "s3"):  # --data is kept
        assert (tmp_path / "demo" / name / "tls" / "server.pem").exists()
        assert (tmp_path / "demo" / name / "cluster" / "ca.pem").exists()
        assert "Traceback" not in (tmp_path / "demo" / name / "server.log").read_text()
