"""Real servers: enable multi-site resilience in place, join with tokens, refusals."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realproc import ServerProcess, requires_evserver, venv_script

pytestmark = [pytest.mark.real, requires_evserver]


def ctl(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(venv_script("evserver-ctl")), "--data", str(data), *args],
                          capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"evserver-ctl {args} failed: {done.stderr}")
    return done


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive_members(server: ServerProcess) -> set[str]:
    """Member ids the server's log last reported alive."""
    state: dict[str, str] = {}
    for line in server.log_text().splitlines():
        if "] member " in line and " -> " in line:
            member, _, change = line.split("] member ", 1)[1].partition(": ")
            state[member] = change.rsplit(" -> ", 1)[1].strip()
    return {m for m, s in state.items() if s == "alive"}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[ServerProcess], data: Path, *extra: str) -> ServerProcess:
    server = ServerProcess(data, extra_args=extra)
    servers.append(server)
    return server.start()


def server_id(data: Path) -> str:
    return (data / "server-id").read_text().strip()


def test_enable_in_place_then_join_with_tokens(tmp_path: Path,
                                               servers: list[ServerProcess]) -> None:
    s1 = start(servers, tmp_path / "s1")
    assert ctl(tmp_path / "s1", "msr", "status").stdout.startswith("standalone")
    ctl(tmp_path / "s1", "msr", "enable")
    wait_for(lambda: "multi-site resilience: member" in s1.log_text(), 10, "the cluster start")
    wait_for(lambda: (tmp_path / "s1" / "cluster" / "self.json").exists(), 10, "self.json")

    token = ctl(tmp_path / "s1", "msr", "token").stdout.strip()
    assert token.startswith("evs1.")
    s2 = start(servers, tmp_path / "s2", "--join-token", token)
    wait_for(lambda: server_id(tmp_path / "s2") in alive_members(s1), 15, "s2 alive at s1")
    wait_for(lambda: (tmp_path / "s2" / "cluster" / "self.json").exists(), 10, "s2 started")

    # A token minted on the new member admits a third server; it meets both.
    token3 = ctl(tmp_path / "s2", "msr", "token").stdout.strip()
    s3 = start(servers, tmp_path / "s3", "--join-token", token3)
    ids = {server_id(tmp_path / f"s{i}") for i in (1, 2, 3)}
    for server, own in ((s1, "s1"), (s2, "s2"), (s3, "s3")):
        others = ids - {server_id(tmp_path / own)}
        wait_for(lambda s=server, o=others: o <= alive_members(s), 15, f"{own} sees all")
    status = json.loads(ctl(tmp_path / "s3", "msr", "status", "--json").stdout)
    assert status["enabled"] and len(status["members"]) == 2

    # A used token is refused: the server says why and exits non-zero.
    s4 = ServerProcess(tmp_path / "s4", extra_args=("--join-token", token))
    s4._spawn()
    assert s4.process is not None
    code = s4.process.wait(30)
    assert code != 0
    assert "cannot join the cluster: join refused: token already used" in s4.log_text()


def test_a_bad_token_is_refused_at_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(venv_script("twistd")), "-n", "--pidfile=", "evserver", "--data",
         str(tmp_path / "x"), "--join-token", "evs1.not-a-token"],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "evserver: error: --join/--join-token:" in done.stderr
