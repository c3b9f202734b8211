"""Tests for evserver-ctl (evserver.ctl)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evserver import ctl, passwords
from evserver.store import Store

ROOT = Path(__file__).resolve().parent.parent


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Run:
    """One evserver-ctl run: its status and outputs."""

    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(
    data: Path,
    *args: str,
    stdin: io.StringIO | None = None,
    answers: list[str] | None = None,
) -> Run:
    out, err = io.StringIO(), io.StringIO()
    asked = list(answers or [])

    def getpass(prompt: str) -> str:
        assert asked, f"unexpected prompt {prompt!r}"
        return asked.pop(0)

    status = ctl.main(
        ["--data", str(data), *args],
        stdin=stdin if stdin is not None else io.StringIO(""),
        stdout=out,
        stderr=err,
        getpass=getpass,
    )
    assert not asked, "not every prepared answer was asked for"
    return Run(status, out.getvalue(), err.getvalue())


def ok(data: Path, *args: str, **kwargs) -> str:
    result = run(data, *args, **kwargs)
    assert (result.status, result.err) == (0, ""), result.err
    return result.out


def fails(data: Path, *args: str, match: str, **kwargs) -> None:
    result = run(data, *args, **kwargs)
    assert result.status == 2
    assert result.err.startswith("evserver-ctl: error: ")
    assert result.err.count("\n") == 1
    assert match in result.err, result.err


def test_creates_data_directory_privately(data: Path) -> None:
    assert ok(data, "domain", "list") == ""
    assert data.is_dir()
    assert oct(data.stat().st_mode & 0o777) == oct(0o700)
    assert (data / "evserver.sqlite3").is_file()


def test_domain_commands(data: Path) -> None:
    assert ok(data, "domain", "add", "example") == "domain 'example' added\n"
    ok(data, "domain", "add", "other")
    listing = ok(data, "domain", "list").splitlines()
    assert listing[0].split() == ["NAME", "ACCOUNTS", "ENCODERS", "POOL", "CREATED"]
    assert [line.split()[:3] for line in listing[1:]] == [
        ["example", "0", "0"],
        ["other", "0", "0"],
    ]
    records = json.loads(ok(data, "domain", "list", "--json"))
    assert [(r["name"], r["accounts"], r["encoders"]) for r in records] == [
        ("example", 0, 0),
        ("other", 0, 0),
    ]
    assert ok(data, "domain", "delete", "other") == "domain 'other' deleted\n"
    fails(data, "domain", "add", "example", match="exists already")
    fails(data, "domain", "delete", "other", match="no domain named 'other'")
    fails(data, "domain", "add", "bad\tname", match="non-printable")


def test_account_with_password_option(data: Path) -> None:
    ok(data, "domain", "add", "d")
    out = ok(data, "account", "add", "--domain", "d", "--password", "pw1", "alice")
    assert out == "viewer account 'alice' added to domain 'd'\n"
    with Store.in_data_dir(data) as store:
        account = store.get_account("alice")
    assert account is not None and account.role == "viewer"
    assert passwords.verify_password(account.password_hash, "pw1")


def test_admin_account_with_password_file(data: Path, tmp_path: Path) -> None:
    ok(data, "domain", "add", "d")
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text("from file\nsecond line ignored\n")
    ok(data, "account", "add", "--domain", "d", "--admin", "--password-file", str(pw_file), "root")
    with Store.in_data_dir(data) as store:
        account = store.get_account("root")
    assert account is not None and account.role == "admin"
    assert passwords.verify_password(account.password_hash, "from file")


def test_password_from_standard_input(data: Path) -> None:
    ok(data, "domain", "add", "d")
    ok(
        data,
        "account",
        "add",
        "--domain",
        "d",
        "--password-file",
        "-",
        "bob",
        stdin=io.StringIO("piped pw\n"),
    )
    with Store.in_data_dir(data) as store:
        account = store.get_account("bob")
    assert account is not None
    assert passwords.verify_password(account.password_hash, "piped pw")


def test_password_prompted_twice_on_a_terminal(data: Path) -> None:
    ok(data, "domain", "add", "d")
    ok(data, "account", "add", "--domain", "d", "carol", stdin=FakeTTY(), answers=["pw", "pw"])
    fails(
        data,
        "account",
        "add",
        "--domain",
        "d",
        "dave",
        stdin=FakeTTY(),
        answers=["pw", "typo"],
        match="do not match",
    )
    with Store.in_data_dir(data) as store:
        assert [a.name for a in store.list_accounts()] == ["carol"]


def test_no_password_without_a_terminal_is_an_error(data: Path) -> None:
    ok(data, "domain", "add", "d")
    fails(data, "account", "add", "--domain", "d", "erin", match="no password given")


def test_account_errors_are_reported_before_asking(data: Path, tmp_path: Path) -> None:
    # No answers are prepared: asking for a password would fail the test.
    fails(data, "account", "add", "--domain", "nope", "x", stdin=FakeTTY(), match="no domain")
    ok(data, "domain", "add", "d")
    ok(data, "account", "add", "--domain", "d", "--password", "p", "alice")
    fails(data, "account", "add", "--domain", "d", "alice", stdin=FakeTTY(), match="exists")
    fails(data, "account", "passwd", "nobody", stdin=FakeTTY(), match="no account named")
    fails(
        data,
        "account",
        "add",
        "--domain",
        "d",
        "--password-file",
        str(tmp_path / "missing"),
        "x",
        match="cannot read password file",
    )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    fails(
        data,
        "account",
        "add",
        "--domain",
        "d",
        "--password-file",
        str(empty),
        "x",
        match="empty first line",
    )


def test_account_list_passwd_delete(data: Path) -> None:
    ok(data, "domain", "add", "d1")
    ok(data, "domain", "add", "d2")
    ok(data, "account", "add", "--domain", "d1", "--password", "a", "alice")
    ok(data, "account", "add", "--domain", "d2", "--password", "b", "--admin", "bob")
    lines = ok(data, "account", "list").splitlines()
    assert lines[0].split() == ["NAME", "DOMAIN", "ROLE", "CREATED"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["alice", "d1", "viewer"],
        ["bob", "d2", "admin"],
    ]
    records = json.loads(ok(data, "account", "list", "--domain", "d2", "--json"))
    assert [(r["name"], r["domain"], r["role"]) for r in records] == [("bob", "d2", "admin")]
    assert "password_hash" not in records[0]
    fails(data, "account", "list", "--domain", "d3", match="no domain named 'd3'")

    out = ok(data, "account", "passwd", "alice", stdin=FakeTTY(), answers=["new", "new"])
    assert out == "password of account 'alice' changed\n"
    with Store.in_data_dir(data) as store:
        account = store.get_account("alice")
    assert account is not None and passwords.verify_password(account.password_hash, "new")

    assert ok(data, "account", "delete", "alice") == "account 'alice' deleted\n"
    fails(data, "account", "delete", "alice", match="no account named 'alice'")
    fails(data, "domain", "delete", "d2", match="1 account(s)")


def test_encoder_add_prints_the_secret_once(data: Path) -> None:
    ok(data, "domain", "add", "d")
    out = ok(data, "encoder", "add", "--domain", "d", "--name", "Front door", "cam-1")
    lines = out.splitlines()
    assert lines[0] == "encoder 'cam-1' ('Front door') added to domain 'd'"
    assert lines[1].startswith("secret: ")
    secret = lines[1].removeprefix("secret: ")
    assert "only once" in lines[2]
    with Store.in_data_dir(data) as store:
        assert store.verify_encoder("cam-1", secret) is not None
    # The secret is never shown again.
    assert secret not in ok(data, "encoder", "list")
    assert secret not in ok(data, "encoder", "list", "--json")


def test_encoder_add_json_and_given_secret(data: Path) -> None:
    ok(data, "domain", "add", "d")
    given = "a-secret-of-some-length"
    record = json.loads(
        ok(data, "encoder", "add", "--domain", "d", "--secret", given, "--json", "cam-2")
    )
    assert record["encoder_id"] == "cam-2" and record["name"] == "cam-2"
    assert record["secret"] == given
    with Store.in_data_dir(data) as store:
        assert store.verify_encoder("cam-2", given) is not None


def test_encoder_list_and_delete(data: Path) -> None:
    ok(data, "domain", "add", "d1")
    ok(data, "domain", "add", "d2")
    ok(data, "encoder", "add", "--domain", "d1", "cam-a")
    ok(data, "encoder", "add", "--domain", "d2", "--name", "Back yard", "cam-b")
    lines = ok(data, "encoder", "list").splitlines()
    assert lines[0].split() == ["ID", "NAME", "DOMAIN", "POOL", "CREATED"]
    assert lines[1].split()[:3] == ["cam-a", "cam-a", "d1"]
    assert lines[2].startswith("cam-b  Back yard  d2")
    records = json.loads(ok(data, "encoder", "list", "--domain", "d2", "--json"))
    assert [(r["encoder_id"], r["name"]) for r in records] == [("cam-b", "Back yard")]
    assert "secret_hash" not in records[0]
    assert ok(data, "encoder", "delete", "cam-a") == "encoder 'cam-a' deleted\n"
    fails(data, "encoder", "delete", "cam-a", match="no encoder with id 'cam-a'")
    fails(data, "encoder", "add", "--domain", "d1", "bad id", match="encoder id 'bad id'")
    fails(data, "encoder", "add", "--domain", "d1", "--secret", "short", "x", match="secret")
    fails(data, "encoder", "add", "--domain", "d9", "x", match="no domain named 'd9'")


def test_usage_errors_and_help(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data, "frob").status == 2
    assert "invalid choice" in capsys.readouterr().err
    assert run(data, "domain").status == 2
    assert run(data, "encoder", "add", "x").status == 2  # --domain is required
    assert "--domain" in capsys.readouterr().err
    assert ctl.main(["--help"]) == 0
    assert "evserver-ctl" in capsys.readouterr().out


def test_unusable_data_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails(blocker / "data", "domain", "list", match="cannot create data directory")


def test_checkout_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    script = ROOT / "tools" / "evserver-ctl"
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, str(script), "--data", str(data), "domain", "add", "from-script"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "domain 'from-script' added\n"
    with Store.in_data_dir(data) as store:
        assert [d.name for d in store.list_domains()] == ["from-script"]
