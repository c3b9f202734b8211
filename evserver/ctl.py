"""``evserver-ctl``: manage the domains, accounts and encoders of a data directory.

Examples::

    evserver-ctl --data DIR domain add example
    evserver-ctl --data DIR account add --domain example alice      # asks twice
    evserver-ctl --data DIR account add --domain example --admin --password-file pw.txt root
    evserver-ctl --data DIR encoder add --domain example cam-1 --name "Front door"
    evserver-ctl --data DIR encoder list --json

It works on the SQLite database directly (safe while the server runs: WAL
mode and short transactions).  Errors print ``evserver-ctl: error: ...`` and
exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import getpass as getpass_module
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from evserver.config import DEFAULT_DATA_DIR
from evserver.store import Account, Domain, Encoder, Store, StoreError

PROG = "evserver-ctl"
ERROR_STATUS = 2


class CtlError(Exception):
    """An error to report as ``evserver-ctl: error: ...``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the domains, accounts and encoders of an evserver data directory.",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"server data directory, created if missing (default: {DEFAULT_DATA_DIR})",
    )
    groups = parser.add_subparsers(dest="group", metavar="{domain,account,encoder,msr}")
    groups.required = True

    domain = groups.add_parser("domain", help="manage domains").add_subparsers(
        dest="command", metavar="{add,list,delete}"
    )
    domain.required = True
    msr = groups.add_parser("msr", help="multi-site resilience (the cluster)").add_subparsers(
        dest="command", metavar="{enable,token,status,provision}"
    )
    msr.required = True
    p = msr.add_parser("enable", help="make this standalone server a cluster of one, in place")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a host name or address of this server for its certificate "
                        "(repeatable; default: 127.0.0.1 and localhost)")
    p = msr.add_parser("token", help="mint a single-use token that admits one new server")
    p.add_argument("--peer", metavar="HOST:PORT",
                   help="this member's peer address as the new server reaches it "
                        "(default: the address the running server advertises)")
    p.add_argument("--lifetime", type=int, default=86400, metavar="SECONDS",
                   help="how long the token stays valid (default: 86400)")
    p = msr.add_parser("status", help="show this server's cluster identity and members")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = msr.add_parser(
        "provision",
        help="admit this server into the cluster of another data directory on this machine")
    p.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="the data directory of a cluster member")
    p.add_argument("--peer", required=True, metavar="HOST:PORT",
                   help="that member's peer address")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a host name or address of this server for its certificate")

    p = domain.add_parser("add", help="create a domain")
    p.add_argument("name")
    p = domain.add_parser("list", help="list domains")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = domain.add_parser("delete", help="delete an empty domain")
    p.add_argument("name")

    account = groups.add_parser("account", help="manage accounts").add_subparsers(
        dest="command", metavar="{add,list,passwd,delete}"
    )
    account.required = True
    p = account.add_parser("add", help="create an account")
    p.add_argument("--domain", required=True, help="the account's domain")
    p.add_argument("--admin", action="store_true", help="an administrator, not a viewer")
    _password_arguments(p)
    p.add_argument("name")
    p = account.add_parser("list", help="list accounts")
    p.add_argument("--domain", help="only this domain's accounts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = account.add_parser("passwd", help="set an account's password")
    _password_arguments(p)
    p.add_argument("name")
    p = account.add_parser("delete", help="delete an account")
    p.add_argument("name")

    encoder = groups.add_parser("encoder", help="manage encoders").add_subparsers(
        dest="command", metavar="{add,list,delete}"
    )
    encoder.required = True
    p = encoder.add_parser("add", help="register an encoder and print its secret")
    p.add_argument("--domain", required=True, help="the encoder's domain")
    p.add_argument("--name", help="display name (default: the id)")
    p.add_argument(
        "--secret", help="use this secret (at least 16 characters) instead of a generated one"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("encoder_id", metavar="ID", help="encoder id: 1-64 of A-Z a-z 0-9 . _ -")
    p = encoder.add_parser("list", help="list encoders")
    p.add_argument("--domain", help="only this domain's encoders")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = encoder.add_parser("delete", help="delete an encoder")
    p.add_argument("encoder_id", metavar="ID")
    return parser


def _password_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password", help="the password (visible to other local users!)")
    group.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password from the first line of FILE ('-' for standard input)",
    )


class _Ctl:
    def __init__(
        self,
        args: argparse.Namespace,
        stdin: TextIO,
        stdout: TextIO,
        ask: Callable[[str], str],
    ) -> None:
        self.args = args
        self.stdin = stdin
        self.out = stdout
        self.ask = ask

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def run(self, store: Store) -> None:
        handler = getattr(self, f"{self.args.group}_{self.args.command}")
        handler(store)

    # -- helpers ----------------------------------------------------------

    def password(self) -> str:
        args = self.args
        if args.password is not None:
            return str(args.password)
        if args.password_file is not None:
            try:
                if args.password_file == "-":
                    text = self.stdin.read()
                else:
                    text = Path(args.password_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CtlError(f"cannot read password file {args.password_file!r}: {e}") from e
            lines = text.splitlines()
            if not lines or not lines[0]:
                raise CtlError(f"password file {args.password_file!r} has an empty first line")
            return lines[0]
        if not self.stdin.isatty():
            raise CtlError(
                "no password given: use --password or --password-file, "
                "or run in a terminal to be asked"
            )
        first = self.ask("Password: ")
        if first != self.ask("Password (again): "):
            raise CtlError("the passwords do not match")
        return first

    def dump(self, records: list[dict[str, Any]]) -> None:
        self.print(json.dumps(records, indent=2, ensure_ascii=False))

    def table(self, header: Sequence[str], rows: list[Sequence[str]]) -> None:
        if not rows:
            return
        columns = zip(header, *rows, strict=True)
        widths = [max(len(cell) for cell in column) for column in columns]
        for row in [header, *rows]:
            cells = zip(row, widths, strict=True)
            self.print("  ".join(cell.ljust(width) for cell, width in cells).rstrip())

    # -- domains ----------------------------------------------------------

    def msr_enable(self, store: Store) -> None:
        from evserver.cluster.ca import ClusterError
        from evserver.cluster.provision import enable

        try:
            identity = enable(Path(self.args.data), self.args.host or ["127.0.0.1", "localhost"],
                              time.time)
        except ClusterError as e:
            raise CtlError(str(e)) from None
        self.print(f"multi-site resilience enabled: cluster {identity.cluster_id}, "
                   f"this server {identity.server_id}")
        self.print("a running server starts its cluster service within a few seconds, "
                   "keeping its data and clients")

    def msr_token(self, store: Store) -> None:
        from evserver.cluster.ca import ClusterError, load_identity
        from evserver.cluster.join import mint

        data_dir = Path(self.args.data)
        try:
            identity = load_identity(data_dir)
        except ClusterError as e:
            raise CtlError(str(e)) from None
        if identity is None or identity.ca_key is None:
            raise CtlError("this server is not a cluster member holding the authority key: "
                           "run 'msr enable' first")
        peer = self.args.peer
        if peer is None:
            try:
                own = json.loads((data_dir / "cluster" / "self.json").read_text("utf-8"))
                peer = f"{own['address']['peer_host']}:{own['address']['peer_port']}"
            except (OSError, ValueError, KeyError) as e:
                raise CtlError("the server has not advertised its peer address yet "
                               f"(is it running?): give --peer HOST:PORT ({e})") from None
        try:
            token = mint(identity, data_dir, peer, self.args.lifetime)
        except ClusterError as e:
            raise CtlError(str(e)) from None
        self.print(token.encode())

    def msr_status(self, store: Store) -> None:
        from evserver.cluster.ca import ClusterError, load_identity
        from evserver.cluster.provision import _read_members

        try:
            identity = load_identity(Path(self.args.data))
        except ClusterError as e:
            raise CtlError(str(e)) from None
        if identity is None:
            status: dict[str, Any] = {"enabled": False}
        else:
            status = {"enabled": True, "cluster_id": identity.cluster_id,
                      "server_id": identity.server_id,
                      "ca_fingerprint": identity.fingerprint(),
                      "members": [m.get("server_id") for m in _read_members(Path(self.args.data))
                                  if not m.get("removed")]}
            try:
                live = json.loads((Path(self.args.data) / "cluster" / "status.json")
                                  .read_text("utf-8"))
                status["member_states"] = {sid: v.get("state")
                                           for sid, v in live.get("members", {}).items()}
                status["states_at"] = _iso(float(live.get("at", 0)))
            except (OSError, ValueError, AttributeError):
                pass
        if self.args.json:
            self.print(json.dumps(status, indent=1))
        elif not status["enabled"]:
            self.print("standalone server (multi-site resilience is not enabled)")
        else:
            for key, value in status.items():
                self.print(f"{key}: {value}")

    def msr_provision(self, store: Store) -> None:
        from evserver.cluster.ca import ClusterError
        from evserver.cluster.provision import provision_member

        host, sep, port = self.args.peer.rpartition(":")
        if not sep or not port.isdigit():
            raise CtlError(f"--peer {self.args.peer!r}: expected HOST:PORT")
        try:
            identity = provision_member(Path(self.args.source), (host, int(port)),
                                        Path(self.args.data),
                                        self.args.host or ["127.0.0.1", "localhost"], time.time)
        except ClusterError as e:
            raise CtlError(str(e)) from None
        self.print(f"server {identity.server_id} admitted to cluster {identity.cluster_id}")

    def domain_add(self, store: Store) -> None:
        domain = store.add_domain(self.args.name)
        self.print(f"domain {domain.name!r} added")

    def domain_list(self, store: Store) -> None:
        domains = store.list_domains()
        accounts: dict[str, int] = {}
        encoders: dict[str, int] = {}
        for account in store.list_accounts():
            accounts[account.domain] = accounts.get(account.domain, 0) + 1
        for encoder in store.list_encoders():
            encoders[encoder.domain] = encoders.get(encoder.domain, 0) + 1
        if self.args.json:
            self.dump(
                [_domain_json(d, accounts.get(d.name, 0), encoders.get(d.name, 0)) for d in domains]
            )
            return
        self.table(
            ("NAME", "ACCOUNTS", "ENCODERS", "CREATED"),
            [
                (
                    d.name,
                    str(accounts.get(d.name, 0)),
                    str(encoders.get(d.name, 0)),
                    _when(d.created),
                )
                for d in domains
            ],
        )

    def domain_delete(self, store: Store) -> None:
        store.delete_domain(self.args.name)
        self.print(f"domain {self.args.name!r} deleted")

    # -- accounts ---------------------------------------------------------

    def account_add(self, store: Store) -> None:
        # Check the cheap things before asking for a password.
        if store.get_domain(self.args.domain) is None:
            raise CtlError(f"no domain named {self.args.domain!r}")
        if store.get_account(self.args.name) is not None:
            raise CtlError(f"account {self.args.name!r} exists already")
        role = "admin" if self.args.admin else "viewer"
        account = store.add_account(self.args.domain, self.args.name, self.password(), role)
        self.print(f"{role} account {account.name!r} added to domain {account.domain!r}")

    def account_list(self, store: Store) -> None:
        accounts = store.list_accounts(self.args.domain)
        if self.args.json:
            self.dump([_account_json(a) for a in accounts])
            return
        self.table(
            ("NAME", "DOMAIN", "ROLE", "CREATED"),
            [(a.name, a.domain, a.role, _when(a.created)) for a in accounts],
        )

    def account_passwd(self, store: Store) -> None:
        if store.get_account(self.args.name) is None:
            raise CtlError(f"no account named {self.args.name!r}")
        store.set_password(self.args.name, self.password())
        self.print(f"password of account {self.args.name!r} changed")

    def account_delete(self, store: Store) -> None:
        store.delete_account(self.args.name)
        self.print(f"account {self.args.name!r} deleted")

    # -- encoders ---------------------------------------------------------

    def encoder_add(self, store: Store) -> None:
        encoder, secret = store.add_encoder(
            self.args.domain, self.args.encoder_id, self.args.name, self.args.secret
        )
        if self.args.json:
            self.out.write(
                json.dumps({**_encoder_json(encoder), "secret": secret}, ensure_ascii=False) + "\n"
            )
            return
        self.print(
            f"encoder {encoder.encoder_id!r} ({encoder.name!r}) added to domain {encoder.domain!r}"
        )
        self.print(f"secret: {secret}")
        self.print("Keep this secret now: it is shown only once (only a hash of it is stored).")

    def encoder_list(self, store: Store) -> None:
        encoders = store.list_encoders(self.args.domain)
        if self.args.json:
            self.dump([_encoder_json(e) for e in encoders])
            return
        self.table(
            ("ID", "NAME", "DOMAIN", "CREATED"),
            [(e.encoder_id, e.name, e.domain, _when(e.created)) for e in encoders],
        )

    def encoder_delete(self, store: Store) -> None:
        store.delete_encoder(self.args.encoder_id)
        self.print(f"encoder {self.args.encoder_id!r} deleted")


def _when(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _domain_json(d: Domain, accounts: int, encoders: int) -> dict[str, Any]:
    return {
        "name": d.name,
        "uid": d.uid,
        "accounts": accounts,
        "encoders": encoders,
        "created": _iso(d.created),
        "updated": _iso(d.updated),
    }


def _account_json(a: Account) -> dict[str, Any]:
    return {
        "name": a.name,
        "domain": a.domain,
        "role": a.role,
        "uid": a.uid,
        "created": _iso(a.created),
        "updated": _iso(a.updated),
    }


def _encoder_json(e: Encoder) -> dict[str, Any]:
    return {
        "encoder_id": e.encoder_id,
        "name": e.name,
        "domain": e.domain,
        "uid": e.uid,
        "created": _iso(e.created),
        "updated": _iso(e.updated),
    }


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    getpass: Callable[[str], str] = getpass_module.getpass,
) -> int:
    """Run ``evserver-ctl``; return the exit status (0 ok, 2 error)."""
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else ERROR_STATUS
    ctl = _Ctl(
        args,
        stdin if stdin is not None else sys.stdin,
        stdout if stdout is not None else sys.stdout,
        getpass,
    )
    try:
        data_dir = Path(args.data).expanduser()
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CtlError(f"cannot create data directory {str(data_dir)!r}: {e}") from e
        with Store.in_data_dir(data_dir) as store:
            ctl.run(store)
    except (CtlError, StoreError) as e:
        err.write(f"{PROG}: error: {e}\n")
        return ERROR_STATUS
    except KeyboardInterrupt:
        err.write(f"{PROG}: error: interrupted\n")
        return ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
