"""Tests for ``twistd evserver``: options, ServerConfig, plugin, startup errors."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import IService, IServiceMaker
from twisted.internet.error import ReactorNotRunning
from twisted.plugin import getPlugins
from twisted.python import usage

from evserver import startup, tap
from evserver.config import ServerConfig, listen_address, load_or_create_server_id, port_of

ROOT = Path(__file__).resolve().parent.parent
SERVICE_EXISTS = (ROOT / "evserver" / "service.py").exists()
TWISTD = Path(sys.executable).parent / "twistd"


def parse(tmp_path: Path, *args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--data", str(tmp_path / "data"), *args])
    return options


def refused(tmp_path: Path, *args: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(tmp_path, *args)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- ServerConfig and endpoint parsing -------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("tcp:5510", (5510, "")),
        ("tcp:port=5511:interface=127.0.0.1", (5511, "127.0.0.1")),
        ("tcp6:port=5512:interface=\\:\\:1", (5512, "::1")),
        ("tcp:0", (0, "")),
        ("unix:/tmp/ev.sock", None),
    ],
)
def test_listen_address(endpoint: str, address: tuple[int, str] | None) -> None:
    assert listen_address(endpoint) == address
    assert port_of(endpoint) == (None if address is None else address[0])


@pytest.mark.parametrize("endpoint", ["", "tcp", "tcp:abc", "bogus:1", "tcp:70000"])
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError):
        listen_address(endpoint)


def test_server_config_defaults(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=str(tmp_path), server_id="s1")
    assert config.data_dir == tmp_path
    assert (config.encoder_endpoint, config.viewer_endpoint) == ("tcp:5510", "tcp:5520")
    assert (config.relay_endpoint, config.admin_endpoint) == ("tcp:5530", "tcp:9443")
    assert config.external_host == "127.0.0.1"
    assert (config.external_encoder_port, config.external_viewer_port) == (5510, 5520)
    assert (config.external_relay_port, config.external_admin_port) == (5530, 9443)
    assert config.tls is True
    assert (config.keepalive_interval, config.keepalive_timeout) == (0.5, 1.5)
    assert config.max_control_frame == 65536
    assert config.max_media_frame == 4 * 1024 * 1024
    assert config.viewer_queue_bytes == 8 * 1024 * 1024
    assert config.stall_timeout == 20.0
    assert config.gop_cache_bytes == 16 * 1024 * 1024
    assert config.stop_linger == 5.0


def test_server_config_external_port_follows_endpoint_unless_given(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path,
        server_id="s1",
        encoder_endpoint="tcp:port=6000:interface=127.0.0.1",
        external_viewer_port=7000,
    )
    assert config.external_encoder_port == 6000
    assert config.external_viewer_port == 7000


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"server_id": "has space"}, "server id"),
        ({"keepalive_interval": 0}, "keepalive_interval must be positive"),
        ({"keepalive_timeout": 0.5}, "keepalive_timeout"),
        ({"stop_linger": -1}, "stop_linger must not be negative"),
        ({"external_encoder_port": 70000}, "port number"),
        ({"external_host": "bad host!"}, "neither an IP address nor a valid host name"),
        ({"encoder_endpoint": "nope:1"}, "is not a server endpoint"),
        ({"encoder_endpoint": "unix:/tmp/x"}, "give its external port"),
    ],
)
def test_server_config_validates(tmp_path: Path, changes: dict, match: str) -> None:
    values = {"data_dir": tmp_path, "server_id": "s1", **changes}
    with pytest.raises(ValueError, match=match):
        ServerConfig(**values)


def test_server_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_server_id(tmp_path)
    assert len(first) == 36
    assert load_or_create_server_id(tmp_path) == first
    assert (tmp_path / "server-id").read_text().strip() == first
    assert [p.name for p in tmp_path.iterdir()] == ["server-id"]  # no temporary left
    (tmp_path / "server-id").write_text("not/valid\n")
    with pytest.raises(ValueError, match="does not hold a valid server id"):
        load_or_create_server_id(tmp_path)


# -- Options -------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = tap.config_from_options(parse(tmp_path))
    assert config == ServerConfig(data_dir=tmp_path / "data", server_id=config.server_id)
    assert (tmp_path / "data").is_dir()
    assert oct((tmp_path / "data").stat().st_mode & 0o777) == oct(0o700)
    # The id is persisted: parsing again gives the same one.
    assert tap.config_from_options(parse(tmp_path)).server_id == config.server_id


def test_every_option_reaches_the_config(tmp_path: Path) -> None:
    config = tap.config_from_options(
        parse(
            tmp_path,
            "--encoder-port", "tcp:port=6510:interface=127.0.0.1",
            "--viewer-port", "tcp:6520",
            "--relay-port", "tcp:6530",
            "--admin-port", "tcp:6443",
            "--external-host", "ev.example.com",
            "--external-encoder-port", "16510",
            "--external-viewer-port", "16520",
            "--external-relay-port", "16530",
            "--external-admin-port", "16443",
            "--plain",
            "--keepalive-interval", "0.5",
            "--keepalive-timeout", "1.5",
            "--max-control-frame", "1024",
            "--max-media-frame", "2048",
            "--viewer-queue-bytes", "4096",
            "--stall-timeout", "7.5",
            "--gop-cache-bytes", "8192",
            "--stop-linger", "0",
        )
    )  # fmt: skip
    assert config.encoder_endpoint == "tcp:port=6510:interface=127.0.0.1"
    assert (config.viewer_endpoint, config.relay_endpoint) == ("tcp:6520", "tcp:6530")
    assert config.admin_endpoint == "tcp:6443"
    assert config.external_host == "ev.example.com"
    assert (config.external_encoder_port, config.external_viewer_port) == (16510, 16520)
    assert (config.external_relay_port, config.external_admin_port) == (16530, 16443)
    assert config.tls is False
    assert (config.keepalive_interval, config.keepalive_timeout) == (0.5, 1.5)
    assert (config.max_control_frame, config.max_media_frame) == (1024, 2048)
    assert (config.viewer_queue_bytes, config.gop_cache_bytes) == (4096, 8192)
    assert isinstance(config.max_control_frame, int)
    assert (config.stall_timeout, config.stop_linger) == (7.5, 0.0)


def test_external_ports_default_to_listening_ports(tmp_path: Path) -> None:
    config = tap.config_from_options(parse(tmp_path, "--relay-port", "tcp:7777"))
    assert config.external_relay_port == 7777


def test_unix_endpoint_needs_an_external_port(tmp_path: Path) -> None:
    sock = str(tmp_path / "enc.sock")
    message = refused(tmp_path, "--encoder-port", f"unix:{sock}")
    assert message == f"--encoder-port 'unix:{sock}' has no TCP port: give --external-encoder-port"
    config = tap.config_from_options(
        parse(tmp_path, "--encoder-port", f"unix:{sock}", "--external-encoder-port", "5510")
    )
    assert config.external_encoder_port == 5510


def test_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = tap.Options()
    options.parseOptions(["--data", "rel/data"])
    assert tap.config_from_options(options).data_dir == tmp_path / "rel" / "data"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--encoder-port", "tcp:abc"], "--encoder-port 'tcp:abc' is not a valid Twisted"),
        (["--viewer-port", "bogus:1"], "Unknown endpoint type: 'bogus'"),
        (["--relay-port", "tcp"], "--relay-port 'tcp' is not a valid Twisted server endpoint"),
        (["--admin-port", ""], "--admin-port '' is not a valid"),
        (["--encoder-port", "tcp:70000"], "out of range"),
        (["--encoder-port", "ssl:5510"], "evserver adds TLS itself"),
        (
            ["--viewer-port", "tcp:5510"],
            "--viewer-port and --encoder-port both listen on port 5510",
        ),
        (["--external-host", "bad host"], "--external-host: 'bad host' is neither"),
        (["--external-host", ""], "--external-host: the external host must not be empty"),
        (["--external-encoder-port", "0"], "--external-encoder-port must be a port number"),
        (["--external-viewer-port", "65536"], "--external-viewer-port must be a port number"),
        (["--external-relay-port", "x"], "--external-relay-port must be a port number"),
        (["--external-admin-port", "-1"], "--external-admin-port must be a port number"),
        (["--keepalive-timeout", "1", "--keepalive-interval", "1"], "must be longer than"),
        (["--stop-linger", "-0.5"], "--stop-linger must be zero or a positive number of sec"),
        (["--data", ""], "--data must not be empty"),
        (["--frobnicate"], "option --frobnicate not recognized"),
        (["--plain=yes"], "--plain"),
        (["extra-argument"], "unexpected argument(s): extra-argument"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], expected: str) -> None:
    message = refused(tmp_path, *args)
    assert expected in message


@pytest.mark.parametrize(
    "option",
    [
        "keepalive-interval",
        "keepalive-timeout",
        "max-control-frame",
        "max-media-frame",
        "viewer-queue-bytes",
        "stall-timeout",
        "gop-cache-bytes",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", ""])
def test_bad_numbers(tmp_path: Path, option: str, value: str) -> None:
    message = refused(tmp_path, f"--{option}", value)
    assert message.startswith(f"--{option} must be a positive ")
    assert message.endswith(f"not {value!r}")


def test_sizes_must_be_whole_numbers(tmp_path: Path) -> None:
    message = refused(tmp_path, "--max-media-frame", "1.5")
    assert message == "--max-media-frame must be a positive whole number of bytes, not '1.5'"


def test_data_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    options = tap.Options()
    with pytest.raises(usage.UsageError, match=r"cannot create data directory .*Not a directory"):
        options.parseOptions(["--data", str(blocker / "data")])
    with pytest.raises(usage.UsageError, match="exists and is not a directory"):
        options.parseOptions(["--data", str(blocker)])


def test_unwritable_data_dir_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("root can write anywhere and there is no /proc to try")
        target = Path("/proc")  # exists, is a directory, refuses new files even to root
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="is not writable"):
        options.parseOptions(["--data", str(target)])


def test_corrupt_server_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "server-id").write_text("\n")
    assert "does not hold a valid server id" in refused(tmp_path)


def test_endpoints_are_checked_before_the_data_dir_is_made(tmp_path: Path) -> None:
    refused(tmp_path, "--encoder-port", "bogus:1")
    assert not (tmp_path / "data").exists()


def test_under_twistd_a_bad_option_is_one_line_and_status_2(tmp_path: Path, capsys) -> None:
    options = tap.Options()
    options.parent = object()  # what twistd sets on a subcommand's options
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--data", str(tmp_path), "--stall-timeout", "0"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "evserver: error: --stall-timeout must be a positive number of seconds, not '0' "
        "(see: twistd evserver --help)\n"
    )


# -- plugin and service maker ------------------------------------------------------


def test_plugin_is_discovered() -> None:
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "evserver"]
    assert makers, "twistd would not find the evserver plugin"
    maker = makers[0]
    assert maker.options is tap.Options
    assert maker.description
    assert "evserver" in str(maker.options())


@pytest.mark.skipif(not SERVICE_EXISTS, reason="evserver/service.py is not written yet")
def test_make_service(tmp_path: Path) -> None:
    options = parse(tmp_path, "--plain")
    service = tap.makeService(options)
    assert IService.providedBy(service)
    store = getattr(service, "store", None)
    if store is not None:
        store.close()


# -- fatal startup errors ------------------------------------------------------------


class FakeReactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stops = 0
        self.when_running: list = []

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stops += 1

    def callWhenRunning(self, f, *args) -> None:
        self.when_running.append((f, args))


def test_fatal_error_while_running() -> None:
    reactor, stream, statuses = FakeReactor(running=True), io.StringIO(), []
    report = startup.FatalErrorReporter(reactor=reactor, stream=stream, exit_hook=statuses.append)
    report("cannot listen on 'tcp:5510':\n  Address already in use")
    assert stream.getvalue() == (
        "evserver: error: cannot listen on 'tcp:5510': Address already in use\n"
    )
    assert statuses == [1]
    assert reactor.stops == 1
    report("a second, consequent error")  # reported once only
    assert stream.getvalue().count("\n") == 1
    assert statuses == [1] and reactor.stops == 1


def test_fatal_error_before_the_reactor_runs() -> None:
    reactor, stream, statuses = FakeReactor(running=False), io.StringIO(), []
    report = startup.FatalErrorReporter(reactor=reactor, stream=stream, exit_hook=statuses.append)
    report("boom")
    assert reactor.stops == 0 and statuses == [1]
    [(stop, args)] = reactor.when_running
    reactor.running = True
    stop(*args)
    assert reactor.stops == 1
    stop(*args)  # stopping twice is harmless
    assert reactor.stops == 1


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_fatal_error_exits_non_zero_after_a_clean_stop(tmp_path: Path) -> None:
    result = _run_python(
        """
        from twisted.internet import reactor
        from evserver.startup import fatal_startup_error
        reactor.addSystemEventTrigger("before", "shutdown", print, "services stopped")
        reactor.callLater(0, fatal_startup_error, "port taken\\nsecond line")
        reactor.run()
        print("reactor returned")
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr == "evserver: error: port taken second line\n"
    assert result.stdout == "services stopped\nreactor returned\n"


def _twistd(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if not TWISTD.exists():
        pytest.skip(f"no twistd beside {sys.executable}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [str(TWISTD), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.real
def test_twistd_exits_1_on_a_fatal_startup_error(tmp_path: Path) -> None:
    tac = tmp_path / "fail.tac"
    tac.write_text(
        textwrap.dedent(
            """
            from twisted.application import service
            from evserver.startup import fatal_startup_error

            class Failing(service.Service):
                def privilegedStartService(self):
                    fatal_startup_error("cannot listen for encoder control: port taken")

            application = service.Application("failing")
            Failing().setServiceParent(application)
            """
        )
    )
    result = _twistd(["-n", "-y", str(tac)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == "evserver: error: cannot listen for encoder control: port taken\n"
    assert "Server Shut Down." in result.stdout  # twistd finished its own shutdown
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.real
def test_twistd_bad_option_is_one_line_and_status_2(tmp_path: Path) -> None:
    result = _twistd(["-n", "evserver", "--data", str(tmp_path / "d"), "--bogus"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "evserver: error: option --bogus not recognized (see: twistd evserver --help)\n"
    )
    assert result.stdout == ""


@pytest.mark.real
def test_twistd_help_lists_the_options(tmp_path: Path) -> None:
    result = _twistd(["evserver", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--encoder-port", "--external-host", "--plain", "--stop-linger"):
        assert option in result.stdout


@pytest.mark.real
@pytest.mark.skipif(not SERVICE_EXISTS, reason="evserver/service.py is not written yet")
def test_twistd_port_taken(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        free = "tcp:port=0:interface=127.0.0.1"
        result = _twistd(
            [
                "-n",
                "evserver",
                "--data", str(tmp_path / "data"),
                "--encoder-port", f"tcp:port={port}:interface=127.0.0.1",
                "--viewer-port", free,
                "--relay-port", free,
                "--admin-port", free,
            ],
            tmp_path,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("evserver: error: ")
    assert str(port) in lines[0]
