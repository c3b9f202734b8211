"""ev-encoder and ev-viewer in process: command lines, error paths, whole runs.

Whole runs use the in-memory network on a Clock (no real time); two tests
use the running reactor to connect to a loopback port nobody listens on.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from evserver.media import decode_file
from evserver.net.client import ClientError, TLSConfig
from evserver.testing.harness import ENCODER_PORT, VIEWER_PORT, MemoryServer, make_store
from evserver.testing.memnet import MemoryNetwork
from evserver.tools import common, encoder, viewer
from evserver.tools.procs import free_ports
from evserver.wire.framing import ErrorCode

DOMAINS = {
    "north": {"accounts": {"alice": "alice-pw"}, "encoders": ["cam1", "cam2", "cam10"]},
    "south": {"accounts": {"carol": "carol-pw"}, "encoders": ["cam9"]},
}


# --------------------------------------------------------------------------
# Command lines


def one_error_line(err: str, prog: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"cam1": "s1" * 8, "cam2": "s2" * 8, "cam10": "s3" * 8,
                                "door": "s4" * 8}))
    return path


@pytest.mark.parametrize(("argv", "expected"), [
    (["--server", "127.0.0.1:abc", "--id", "a", "--secret", "s"], "expected HOST:PORT"),
    (["--server", "127.0.0.1:70000", "--id", "a", "--secret", "s"], "port must be 1..65535"),
    (["--server", ":5510", "--id", "a", "--secret", "s"], "no host"),
    (["--server", "bad host!", "--id", "a", "--secret", "s"], "nor a valid host name"),
    ([], "give --id ID --secret SECRET, or --secrets-file FILE"),
    (["--id", "a", "--id", "b", "--secret", "s"], "--secret goes with exactly one --id"),
    (["--id", "a", "--secret", "s", "--size", "641x360"], "width and height must be even"),
    (["--id", "a", "--secret", "s", "--bitrate", "fast"], "not a bitrate"),
    (["--id", "a", "--secret", "s", "--fps", "0"], "must be a positive number"),
    (["--id", "a", "--secret", "s", "--duration", "-1"], "must be a positive number"),
    (["--id", "a", "--secret", "s", "--ca", "/nonexistent/ca.pem"], "--ca: cannot read"),
    (["--id", "a", "--secret", "s", "--ca", "x", "--plain"], "not allowed with argument"),
])
def test_encoder_usage_errors(argv: list[str], expected: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert encoder.main(argv) == common.EXIT_USAGE
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err, "ev-encoder")
    assert "(see ev-encoder --help)" in captured.err
    assert captured.out == ""


def test_encoder_secrets_file_errors(tmp_path: Path, secrets_file: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    listy = tmp_path / "list.json"
    listy.write_text('["cam1"]')
    cases = [
        (["--secrets-file", str(tmp_path / "missing.json")], "cannot read the secrets file"),
        (["--secrets-file", str(bad)], "is not valid JSON"),
        (["--secrets-file", str(listy)], "must hold a JSON object"),
        (["--secrets-file", str(secrets_file), "--id-prefix", "cam", "--count", "4"],
         "has 3 encoder(s) whose id starts with 'cam', not 4"),
        (["--secrets-file", str(secrets_file), "--id-prefix", "zz"], "no encoder in"),
        (["--secrets-file", str(secrets_file), "--id", "cam7"], "no secret for 'cam7'"),
    ]
    for argv, expected in cases:
        assert encoder.main(argv) == common.EXIT_USAGE, argv
        assert expected in one_error_line(capsys.readouterr().err, "ev-encoder")


def test_encoder_selects_from_secrets_file(secrets_file: Path) -> None:
    parser = encoder.build_parser()

    def chosen(*argv: str) -> list[str]:
        args = parser.parse_args(["--secrets-file", str(secrets_file), *argv])
        return [i for i, _ in encoder.select_encoders(parser, args)]

    assert chosen("--id-prefix", "cam") == ["cam1", "cam2", "cam10"]  # natural order
    assert chosen("--id-prefix", "cam", "--count", "2") == ["cam1", "cam2"]
    assert chosen() == ["cam1", "cam2", "cam10", "door"]
    assert chosen("--id", "door", "--id", "cam2") == ["door", "cam2"]


def test_encoder_missing_media_file(capsys: pytest.CaptureFixture[str]) -> None:
    status = encoder.main(["--id", "a", "--secret", "s", "--source", "/nonexistent.mp4"])
    assert status == common.EXIT_ERROR
    assert "/nonexistent.mp4: no such file" in one_error_line(capsys.readouterr().err,
                                                               "ev-encoder")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--account", "a", "--password", "p", "--watch", "cam1"],
     "give --frames N and/or --duration SECONDS"),
    (["--account", "a", "--password", "p"], "one of the arguments --watch --watch-all --list"),
    (["--account", "a", "--password", "p", "--list", "--out", "x.h264"],
     "--list cannot be combined"),
    (["--account", "a", "--password", "p", "--watch", "c", "--watch-all", "--frames", "1"],
     "not allowed with argument"),
    (["--password", "p", "--list"], "the following arguments are required: --account"),
    (["--account", "a", "--list"], "one of the arguments --password --password-file"),
    (["--account", "a", "--password-file", "/nonexistent", "--list"],
     "cannot read the password file"),
    (["--account", "a", "--password", "p", "--watch", "c", "--frames", "0"],
     "must be at least 1"),
    (["--server", "h:1:2", "--account", "a", "--password", "p", "--list"],
     "'h:1' is neither an IP address nor a valid host name"),
])
def test_viewer_usage_errors(argv: list[str], expected: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert viewer.main(argv) == common.EXIT_USAGE
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err, "ev-viewer")
    assert captured.out == ""


def test_tls_options(tmp_path: Path) -> None:
    parser = viewer.build_parser()
    base = ["--account", "a", "--password", "p", "--list"]
    assert common.tls_config(parser, parser.parse_args(base)) == TLSConfig(enabled=True)
    assert common.tls_config(parser, parser.parse_args([*base, "--plain"])) == TLSConfig(False)
    insecure = common.tls_config(parser, parser.parse_args([*base, "--insecure"]))
    assert insecure == TLSConfig(enabled=True, insecure=True)
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert common.tls_config(parser, parser.parse_args([*base, "--ca", str(pem)])).ca == str(pem)
    pem.write_text("not a certificate")
    with pytest.raises(SystemExit):
        common.tls_config(parser, parser.parse_args([*base, "--ca", str(pem)]))


def test_servers_default_port() -> None:
    parser = argparse.ArgumentParser()
    servers = common.parse_servers(parser, ["a.example", "b.example:7000", "[::1]:7001"], 5520)
    assert [(s.host, s.port) for s in servers] == [
        ("a.example", 5520), ("b.example", 7000), ("::1", 7001)]
    assert [str(s) for s in common.parse_servers(parser, None, 5510)] == ["127.0.0.1:5510"]


def test_natural_key() -> None:
    ids = ["cam10", "cam2", "1a", "a1", "cam1", "cam", "2", "10"]
    assert sorted(ids, key=common.natural_key) == [
        "1a", "2", "10", "a1", "cam", "cam1", "cam2", "cam10"]


def test_value_parsers() -> None:
    assert common.bitrate("2M") == 2_000_000
    assert common.bitrate("1.5m") == 1_500_000
    assert common.bitrate("500k") == 500_000
    assert common.bitrate("64000") == 64_000
    assert common.frame_size("320x180") == (320, 180)
    for bad in ("0", "-1M", "k", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.bitrate(bad)
    for bad in ("320", "15x16", "320x181", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.frame_size(bad)


def test_describe_client_error() -> None:
    auth = ClientError("unknown encoder or wrong secret", ErrorCode.AUTH_FAILED)
    assert common.describe_client_error(auth, "encoder 'x'") == (
        "encoder 'x': refused by the server: unknown encoder or wrong secret (AUTH_FAILED)")
    assert common.describe_client_error(ClientError("no encoder 'y'", ErrorCode.NOT_FOUND)) == (
        "no encoder 'y' (NOT_FOUND)")
    cert = common.describe_client_error(
        ClientError("[('SSL routines', '', 'certificate verify failed')]"))
    assert cert.startswith("connection failed: ") and "--ca" in cert
    plain = common.describe_client_error(ClientError("Connection was closed cleanly."),
                                         tls=TLSConfig(enabled=False))
    assert "leave out --plain" in plain
    assert common.describe_client_error(ClientError("cannot reach h:1: refused")) == (
        "cannot reach h:1: refused")


# --------------------------------------------------------------------------
# Figures


def test_percentile() -> None:
    assert viewer.percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert viewer.percentile(values, 0.5) == 50.0
    assert viewer.percentile(values, 0.99) == 99.0
    assert viewer.percentile([7.0], 0.99) == 7.0


def test_count_gaps_examples() -> None:
    assert viewer.count_gaps([], True) == 0
    assert viewer.count_gaps([0], False) == 1  # the first frame is no keyframe
    assert viewer.count_gaps([0, 40, 80, 120], True) == 0
    assert viewer.count_gaps([0, 40, 80, 200, 240], True) == 1
    assert viewer.count_gaps([0, 40, 40, 80], True) == 1  # a repeated timestamp
    assert viewer.count_gaps([0, 40, 80, 0, 40], True) == 1  # backwards: a restart
    assert viewer.count_gaps([0, 40, 85, 120], True) == 0  # jitter under 1.5x


@given(interval=st.integers(1, 10**6), length=st.integers(10, 200), data=st.data())
def test_count_gaps_finds_each_hole(interval: int, length: int, data: st.DataObject) -> None:
    timestamps = [i * interval for i in range(length)]
    assert viewer.count_gaps(timestamps, True) == 0
    # Remove a few frames that are not next to each other (nor the first two).
    holes = data.draw(st.sets(st.integers(2, length - 2), max_size=length // 5))
    holes = {h for h in holes if h - 1 not in holes}
    holey = [t for i, t in enumerate(timestamps) if i not in holes]
    assert viewer.count_gaps(holey, True) == len(holes)


# --------------------------------------------------------------------------
# Whole runs on the in-memory network


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.net = MemoryNetwork()
        self.store, self.secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
        self.server = MemoryServer(self.net, "127.0.0.1", self.store)
        self.secrets_path = tmp_path / "secrets.json"
        north = DOMAINS["north"]["encoders"]
        self.secrets_path.write_text(json.dumps({e: self.secrets[e] for e in north}))
        self.tmp_path = tmp_path

    def encoder(self, *argv: str) -> tuple[encoder.EncoderRun, io.StringIO, io.StringIO]:
        out, err = io.StringIO(), io.StringIO()
        run, _ = encoder.build_run(["--plain", *argv], self.net.clock, out, err,
                                   connector=self.server.connector())
        return run, out, err

    def viewer(self, *argv: str, account: str = "alice",
               wallclock: Any = None) -> tuple[viewer.ViewerRun, io.StringIO, io.StringIO]:
        out, err = io.StringIO(), io.StringIO()
        password = f"{account}-pw"
        extra = {"wallclock": wallclock} if wallclock is not None else {}
        run, _ = viewer.build_run(["--plain", "--account", account, "--password", password,
                                   *argv], self.net.clock, out, err,
                                  connector=self.server.connector(), **extra)
        return run, out, err

    def start(self, run: common.ToolRun) -> list[Any]:
        """Start a run; the returned list gets its exit status (errors reported first)."""
        outcome: list[Any] = []
        common.drive(run, run.err).addBoth(outcome.append)
        return outcome

    def until(self, outcome: list[Any], timeout: float = 60.0) -> int:
        self.net.run_until(lambda: bool(outcome), timeout)
        assert isinstance(outcome[0], int), outcome[0]
        return outcome[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def test_watch_all_to_frames_target(world: World) -> None:
    enc, enc_out, enc_err = world.encoder("--secrets-file", str(world.secrets_path),
                                          "--id-prefix", "cam", "--source", "testsrc",
                                          "--size", "160x90", "--keyframe-interval", "25",
                                          "--json")
    enc_done = world.start(enc)
    world.net.advance(0.5)
    assert "3 of 3 encoder(s) connected to 127.0.0.1:5510" in enc_err.getvalue()
    out_path = world.tmp_path / "first.h264"
    clock = iter(range(10**9))
    view, out, err = world.viewer("--watch-all", "--frames", "150", "--duration", "20",
                                  "--decode", "--out", str(out_path), "--json",
                                  wallclock=lambda: world.net.clock.seconds() + 0.001
                                  * (next(clock) % 3))
    status = world.until(world.start(view))
    assert status == common.EXIT_OK, err.getvalue()
    report = json.loads(out.getvalue())
    assert report["frames"] == 150 and report["completed"] and not report["interrupted"]
    assert set(report["encoders"]) == {"cam1", "cam2", "cam10"}
    assert sum(e["frames"] for e in report["encoders"].values()) == 150
    assert report["gaps"] == 0
    assert report["decode_errors"] == 0 and report["decoded_frames"] == 150
    assert report["keyframes"] == sum(e["keyframes"] for e in report["encoders"].values()) >= 3
    assert report["out"]["encoder"] == "cam1"  # the first in natural order
    assert report["encoders"]["cam1"]["size"] == "160x90"
    assert report["duration_s"] == pytest.approx(2.0, abs=0.1)  # 150 frames of 3 x 25 fps
    assert report["reconnects"] == 0
    frames, errors = decode_file(out_path)
    assert frames == report["out"]["frames"] == report["encoders"]["cam1"]["frames"]
    assert errors == 0
    # Frames carry wall-clock capture times; latency here is the injected skew.
    assert report["latency_p50_ms"] is not None and report["latency_p99_ms"] <= 2.001
    assert err.getvalue() == ""
    enc.interrupt()
    assert world.until(enc_done) == common.EXIT_OK
    sent = json.loads(enc_out.getvalue())
    assert sent["encoders"] == 3 and sent["failed"] == 0 and sent["online"] == 3
    assert sent["starts"] == 3 and sent["reconnects"] == 0
    assert sent["per_encoder"]["cam1"]["server"] == "s1"
    assert sent["per_encoder"]["cam1"]["frames"] >= report["encoders"]["cam1"]["frames"]


def test_frames_not_reached_within_duration(world: World) -> None:
    enc, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}",
                              "--fps", "10", "--keyframe-interval", "10")
    world.start(enc)
    view, out, err = world.viewer("--watch", "cam1", "--frames", "1000", "--duration", "3",
                                  "--json")
    status = world.until(world.start(view))
    assert status == common.EXIT_INCOMPLETE
    report = json.loads(out.getvalue())
    assert 25 <= report["frames"] <= 31 and not report["completed"]
    assert report["decode_errors"] is None  # not asked to decode
    assert report["encoders"]["cam1"]["keyframes"] >= 2
    line = one_error_line(err.getvalue(), "ev-viewer")
    assert f"only {report['frames']} of 1000 frames arrived within 3.0 s" in line
    enc.interrupt()


def test_watch_before_the_encoder_comes_online(world: World) -> None:
    view, out, err = world.viewer("--watch", "cam2", "--frames", "20", "--duration", "10",
                                  "--json", "--stats-interval", "1")
    done = world.start(view)
    world.net.advance(2.0)
    assert not done
    assert "watching 1: no frames yet" in err.getvalue()
    enc, _, _ = world.encoder("--id", "cam2", f"--secret={world.secrets['cam2']}")
    world.start(enc)
    assert world.until(done) == common.EXIT_OK
    report = json.loads(out.getvalue())
    assert report["frames"] == 20 and report["gaps"] == 0
    enc.interrupt()


def test_watch_all_picks_up_encoders_coming_online(world: World) -> None:
    view, out, err = world.viewer("--watch-all", "--duration", "4", "--json")
    done = world.start(view)
    world.net.advance(1.0)
    assert "no encoder of domain 'north' is online yet; waiting" in err.getvalue()
    first, _, _ = world.encoder("--id", "cam10", f"--secret={world.secrets['cam10']}")
    world.start(first)
    world.net.advance(1.0)
    second, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}")
    world.start(second)
    assert world.until(done) == common.EXIT_OK
    report = json.loads(out.getvalue())
    assert set(report["encoders"]) == {"cam10", "cam1"}
    assert report["encoders"]["cam10"]["frames"] > report["encoders"]["cam1"]["frames"] > 20


def test_encoder_reconnect_shows_as_gap(world: World) -> None:
    enc, enc_out, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}",
                                    "--keyframe-interval", "5", "--json")
    world.start(enc)
    view, out, _ = world.viewer("--watch", "cam1", "--duration", "5", "--json")
    done = world.start(view)
    world.net.advance(2.0)
    client = enc.entries[0].client
    assert client is not None and client.control is not None
    client.control.transport.abortConnection()  # type: ignore[union-attr]
    assert world.until(done) == common.EXIT_OK
    report = json.loads(out.getvalue())
    assert report["gaps"] >= 1
    assert report["encoders"]["cam1"]["frames"] > 100
    enc.interrupt()
    sent = json.loads(enc_out.getvalue())
    assert sent["reconnects"] == 1 and sent["starts"] == 2


def test_interrupted_viewer_still_reports(world: World) -> None:
    enc, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}")
    world.start(enc)
    view, out, err = world.viewer("--watch", "cam1", "--duration", "100")
    done = world.start(view)
    world.net.advance(2.0)
    view.interrupt()
    assert world.until(done) == common.EXIT_OK
    summary = out.getvalue().splitlines()
    frames = int(summary[0].split(" frames, ")[0])
    assert 45 <= frames <= 52  # 2 s at 25 fps
    assert any(line.startswith("  cam1: ") for line in summary)
    assert "video from s1; 0 move(s) to another server" in summary
    assert err.getvalue() == ""


def test_list_table_and_json(world: World) -> None:
    enc, _, _ = world.encoder("--id", "cam2", f"--secret={world.secrets['cam2']}")
    world.start(enc)
    world.net.advance(0.5)
    view, out, _ = world.viewer("--list")
    assert world.until(world.start(view)) == common.EXIT_OK
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert rows == [["ID", "NAME", "STATE", "SERVER"],
                    ["cam1", "Camera", "cam1", "offline", "-"],
                    ["cam2", "Camera", "cam2", "online", "s1"],
                    ["cam10", "Camera", "cam10", "offline", "-"]]
    view, out, _ = world.viewer("--list", "--json", account="carol")
    assert world.until(world.start(view)) == common.EXIT_OK
    assert json.loads(out.getvalue()) == {"domain": "south", "encoders": [
        {"id": "cam9", "name": "Camera cam9", "state": "offline", "server": None}]}


def test_refusals(world: World) -> None:
    enc, _, err = world.encoder("--id", "cam1", "--secret", "wrong-secret-0123456789")
    assert world.until(world.start(enc)) == common.EXIT_ERROR
    assert one_error_line(err.getvalue(), "ev-encoder") == (
        "ev-encoder: error: encoder 'cam1': refused by the server: unknown encoder or wrong "
        "secret (AUTH_FAILED)")
    out, err = io.StringIO(), io.StringIO()
    run, _ = viewer.build_run(["--plain", "--account", "alice", "--password", "nope",
                               "--list"], world.net.clock, out, err,
                              connector=world.server.connector())
    assert world.until(world.start(run)) == common.EXIT_ERROR
    assert one_error_line(err.getvalue(), "ev-viewer") == (
        "ev-viewer: error: login as 'alice': refused by the server: unknown account or wrong "
        "password (AUTH_FAILED)")
    view, out, err = world.viewer("--watch", "cam9", "--frames", "5", "--duration", "5",
                                  "--json")
    assert world.until(world.start(view)) == common.EXIT_ERROR
    assert one_error_line(err.getvalue(), "ev-viewer") == (
        "ev-viewer: error: cannot watch 'cam9': no encoder 'cam9' (NOT_FOUND)")
    assert out.getvalue() == ""


def test_one_bad_encoder_among_many(world: World, tmp_path: Path) -> None:
    secrets = {e: world.secrets[e] for e in DOMAINS["north"]["encoders"]}
    secrets["cam2"] = "wrong-secret-0123456789"
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(secrets))
    enc, out, err = world.encoder("--secrets-file", str(path), "--id-prefix", "cam",
                                  "--duration", "3", "--json")
    status = world.until(world.start(enc))
    assert status == common.EXIT_ERROR
    errors = [line for line in err.getvalue().splitlines() if ": error: " in line]
    assert errors == ["ev-encoder: error: encoder 'cam2': refused by the server: unknown "
                      "encoder or wrong secret (AUTH_FAILED)"]
    assert "ev-encoder: 2 of 3 encoder(s) connected" in err.getvalue()
    report = json.loads(out.getvalue())
    assert report["failed"] == 1 and report["online"] == 2 and report["encoders"] == 3
    assert "AUTH_FAILED" in report["per_encoder"]["cam2"]["error"]
    assert report["per_encoder"]["cam1"]["error"] is None


def test_encoders_start_staggered(world: World, tmp_path: Path) -> None:
    path = tmp_path / "many.json"
    path.write_text(json.dumps({f"x{i}": "secret-of-x-0123456789" for i in range(5)}))
    enc, _, _ = world.encoder("--secrets-file", str(path), "--rate", "2", "--duration", "10")
    world.start(enc)
    world.net.advance(0.25)
    started = [sum(e.client is not None for e in enc.entries)]
    for _ in range(4):
        world.net.advance(0.5)
        started.append(sum(e.client is not None for e in enc.entries))
    assert started == [1, 2, 3, 4, 5]  # at 0.25, 0.75, ... s: one every 0.5 s
    enc.interrupt()


def test_unreachable_on_memory_network(world: World) -> None:
    world.net.unlisten("127.0.0.1", ENCODER_PORT)
    enc, out, err = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}", "--json")
    assert world.until(world.start(enc)) == common.EXIT_ERROR
    line = one_error_line(err.getvalue(), "ev-encoder")
    assert line.startswith("ev-encoder: error: encoder 'cam1': cannot reach 127.0.0.1:5510")
    report = json.loads(out.getvalue())  # the report tells what failed
    assert report["failed"] == 1 and report["online"] == 0
    assert report["per_encoder"]["cam1"]["error"] == line.removeprefix("ev-encoder: error: ")


# --------------------------------------------------------------------------
# The real reactor, a port nobody listens on


@pytest.fixture
def closed_port() -> int:
    return free_ports(1)[0]


@pytest_twisted.inlineCallbacks
def test_unreachable_server_viewer(closed_port: int) -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    out, err = io.StringIO(), io.StringIO()
    run, _ = viewer.build_run(["--server", f"127.0.0.1:{closed_port}", "--account", "a",
                               "--password", "p", "--watch", "cam1", "--duration", "20",
                               "--json"], reactor, out, err)
    status = yield common.drive(run, err)
    assert status == common.EXIT_ERROR
    line = one_error_line(err.getvalue(), "ev-viewer")
    assert line.startswith(f"ev-viewer: error: cannot reach 127.0.0.1:{closed_port}: ")
    assert "refused" in line.lower()
    assert run.elapsed < 5
    assert out.getvalue() == ""


@pytest_twisted.inlineCallbacks
def test_unreachable_server_encoder(closed_port: int) -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    out, err = io.StringIO(), io.StringIO()
    run, _ = encoder.build_run(["--server", f"127.0.0.1:{closed_port}", "--plain", "--id",
                                "cam1", "--secret", "s", "--json"], reactor, out, err)
    status = yield common.drive(run, err)
    assert status == common.EXIT_ERROR
    line = one_error_line(err.getvalue(), "ev-encoder")
    assert line.startswith(f"ev-encoder: error: encoder 'cam1': cannot reach "
                           f"127.0.0.1:{closed_port}: ")
    assert "refused" in line.lower()
    assert json.loads(out.getvalue())["failed"] == 1


def test_file_source_to_decoding_viewer(world: World, tmp_path: Path) -> None:
    from evserver.media import make_test_video_file

    video = tmp_path / "clip.mp4"
    make_test_video_file(video, seconds=1, fps=25, width=160, height=90)
    enc, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}",
                              "--source", str(video))
    world.start(enc)
    view, out, err = world.viewer("--watch", "cam1", "--frames", "60", "--duration", "10",
                                  "--decode", "--json")
    assert world.until(world.start(view)) == common.EXIT_OK, err.getvalue()
    report = json.loads(out.getvalue())
    # 60 frames of a 25-frame clip: it loops, and each loop starts with a keyframe.
    assert report["decoded_frames"] == 60 and report["decode_errors"] == 0
    assert report["keyframes"] >= 2 and report["gaps"] == 0
    assert report["encoders"]["cam1"]["size"] == "160x90"
    enc.interrupt()


def test_synthetic_stream_is_not_saved_or_decoded(world: World, tmp_path: Path) -> None:
    enc, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}")
    world.start(enc)
    target = tmp_path / "nothing.h264"
    view, out, err = world.viewer("--watch", "cam1", "--frames", "30", "--duration", "1",
                                  "--decode", "--out", str(target), "--json")
    status = world.until(world.start(view))
    assert status == common.EXIT_INCOMPLETE  # 1 s at 25 fps: fewer than 30 frames
    report = json.loads(out.getvalue())
    assert report["decoded_frames"] == 0 and report["decode_errors"] == 0
    assert report["encoders"]["cam1"]["undecodable_frames"] == report["frames"] > 20
    assert report["out"]["frames"] == 0 and target.stat().st_size == 0
    assert "sent no H.264 (a synthetic source?)" in err.getvalue()
    enc.interrupt()


def test_interrupted_before_frames_target(world: World) -> None:
    enc, _, _ = world.encoder("--id", "cam1", f"--secret={world.secrets['cam1']}")
    world.start(enc)
    view, out, err = world.viewer("--watch", "cam1", "--frames", "1000", "--duration", "60",
                                  "--json")
    done = world.start(view)
    world.net.advance(1.0)
    view.interrupt()
    assert world.until(done) == common.EXIT_INCOMPLETE
    report = json.loads(out.getvalue())
    assert report["interrupted"] and not report["completed"]
    assert one_error_line(err.getvalue(), "ev-viewer").endswith(
        f"only {report['frames']} of 1000 frames arrived in the 1.0 s before the run was "
        "interrupted")
    enc.interrupt()


def test_secret_and_password_may_start_with_a_dash(world: World) -> None:
    assert common.join_option_values(["--secret", "-x", "--id", "a", "--", "--secret", "y"],
                                     ("--secret",)) == [
        "--secret=-x", "--id", "a", "--", "--secret", "y"]
    world.store.add_encoder("north", "dash", secret="-dash-secret-0123456789")
    world.store.add_account("north", "dasher", "-pw")
    enc, _, err = world.encoder("--id", "dash", "--secret", "-dash-secret-0123456789")
    world.start(enc)
    world.net.advance(0.5)
    assert "1 of 1 encoder(s) connected" in err.getvalue()
    out = io.StringIO()
    run, _ = viewer.build_run(["--plain", "--account", "dasher", "--password", "-pw",
                               "--list"], world.net.clock, out, io.StringIO(),
                              connector=world.server.connector())
    assert world.until(world.start(run)) == common.EXIT_OK
    assert "dash  " in out.getvalue() and "online" in out.getvalue()
    enc.interrupt()


def test_unwritable_out_file(world: World, tmp_path: Path) -> None:
    view, out, err = world.viewer("--watch", "cam1", "--duration", "5",
                                  "--out", str(tmp_path / "missing" / "x.h264"))
    assert world.until(world.start(view), timeout=1) == common.EXIT_ERROR
    line = one_error_line(err.getvalue(), "ev-viewer")
    assert "cannot write" in line and "No such file or directory" in line
    assert out.getvalue() == ""


# --------------------------------------------------------------------------
# ev-viewer on a simulated three-server cluster


class ClusterWorld:
    """SimCluster (servers s1, s2, s3 on 127.0.1.1-3) with the tools on its network."""

    def __init__(self, tmp_path: Path) -> None:
        from evserver.testing.simcluster import SimCluster

        self.store, self.secrets = make_store(tmp_path / "db.sqlite3", DOMAINS)
        self.sim = SimCluster(self.store)
        self.net = self.sim.net
        self.tmp_path = tmp_path
        self.seed = 0

    def kwargs(self) -> dict[str, Any]:
        self.seed += 1
        return {"connector": lambda a: self.net.endpoint(a.host, a.port, "127.0.0.1"),
                "rng": random.Random(self.seed)}

    def servers(self, port: int, first: int) -> list[str]:
        hosts = [s.host for s in self.sim.servers]
        hosts = hosts[first:] + hosts[:first]
        return [arg for host in hosts for arg in ("--server", f"{host}:{port}")]

    def encoder(self, encoder_id: str, first: int) -> encoder.EncoderRun:
        run, _ = encoder.build_run(
            ["--plain", *self.servers(ENCODER_PORT, first), "--id", encoder_id,
             f"--secret={self.secrets[encoder_id]}", "--source", "testsrc", "--size", "160x90",
             "--keyframe-interval", "25"], self.net.clock, io.StringIO(), io.StringIO(),
            **self.kwargs())
        common.drive(run, run.err)
        return run

    def viewer(self, first: int, *argv: str) -> tuple[viewer.ViewerRun, io.StringIO,
                                                      io.StringIO, list[Any]]:
        out, err = io.StringIO(), io.StringIO()
        run, _ = viewer.build_run(["--plain", *self.servers(VIEWER_PORT, first), "--account",
                                   "alice", "--password", "alice-pw", *argv],
                                  self.net.clock, out, err, **self.kwargs())
        outcome: list[Any] = []
        common.drive(run, err).addBoth(outcome.append)
        return run, out, err, outcome

    def until(self, outcome: list[Any], timeout: float = 60.0) -> int:
        self.net.run_until(lambda: bool(outcome), timeout)
        assert isinstance(outcome[0], int), outcome[0]
        return outcome[0]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterWorld]:
    w = ClusterWorld(tmp_path)
    yield w
    w.store.close()


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_viewer_follows_a_failover(cluster: ClusterWorld, fault: str) -> None:
    enc = cluster.encoder("cam1", first=0)  # hosted by s1
    out_path = cluster.tmp_path / "cam1.h264"
    view, out, err, done = cluster.viewer(1, "--watch", "cam1", "--duration", "8", "--decode",
                                          "--out", str(out_path), "--json")
    cluster.net.advance(3.0)
    assert view.client is not None and view.client.placed == {"cam1": "s1"}
    (cluster.sim.kill if fault == "kill" else cluster.sim.freeze)(0)
    assert cluster.until(done) == common.EXIT_OK, err.getvalue()
    report = json.loads(out.getvalue())
    cam1 = report["encoders"]["cam1"]
    assert report["servers_used"] == ["s1", "s2"] and cam1["servers"] == ["s1", "s2"]
    assert report["moves"] == 1 and report["reconnects"] == 0  # the home (s2) stayed
    # The pause is a gap; every frame after it is counted and decoded.
    assert report["gaps"] == cam1["gaps"] == 1
    assert report["frames"] > 25 * (8 - 3.5)
    assert report["decoded_frames"] == report["frames"] and report["decode_errors"] == 0
    assert cam1["skipped_before_keyframe"] == 0 and cam1["keyframes"] >= 6
    frames, errors = decode_file(out_path)
    assert frames == report["out"]["frames"] == report["frames"] and errors == 0
    assert err.getvalue() == ""
    enc.interrupt()


def test_watch_all_survives_the_home_failover(cluster: ClusterWorld) -> None:
    for encoder_id, first in (("cam1", 0), ("cam2", 1), ("cam10", 2)):
        cluster.encoder(encoder_id, first)
    cluster.net.advance(0.5)
    _, out, _, done = cluster.viewer(2, "--list", "--json")
    assert cluster.until(done) == common.EXIT_OK
    assert [(e["id"], e["server"]) for e in json.loads(out.getvalue())["encoders"]] == [
        ("cam1", "s1"), ("cam2", "s2"), ("cam10", "s3")]
    _, out, err, done = cluster.viewer(0, "--watch-all", "--duration", "6", "--json",
                                       "--stats-interval", "2")
    cluster.net.advance(2.5)
    cluster.sim.kill(0)  # the home, and cam1's host
    assert cluster.until(done) == common.EXIT_OK, err.getvalue()
    report = json.loads(out.getvalue())
    per = report["encoders"]
    assert report["reconnects"] == 1 and report["moves"] == 1
    assert report["servers_used"] == ["s1", "s2", "s3"]
    assert per["cam1"]["servers"] == ["s1", "s2"] and per["cam1"]["gaps"] == 1
    # The video of the other servers went on while the home moved: no gap at all.
    assert per["cam2"]["servers"] == ["s2"] and per["cam2"]["gaps"] == 0
    assert per["cam10"]["servers"] == ["s3"] and per["cam10"]["gaps"] == 0
    assert per["cam2"]["frames"] >= 6 * 25 - 15
    assert "watching 3: cam1 " in err.getvalue()
    assert "error" not in err.getvalue()


def test_another_domains_encoder_in_a_cluster(cluster: ClusterWorld) -> None:
    cluster.encoder("cam9", first=2)  # domain south, hosted by s3
    cluster.net.advance(0.5)
    _, out, err, done = cluster.viewer(0, "--watch", "cam9", "--frames", "5", "--duration",
                                       "5", "--json")
    assert cluster.until(done) == common.EXIT_ERROR
    assert one_error_line(err.getvalue(), "ev-viewer") == (
        "ev-viewer: error: cannot watch 'cam9': no encoder 'cam9' (NOT_FOUND)")
    assert out.getvalue() == ""
