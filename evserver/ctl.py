"""``evserver-ctl``: manage the domains, accounts, encoders, server pools and server
weights of a data directory.

Examples::

    evserver-ctl --data DIR domain add example
    evserver-ctl --data DIR account add --domain example alice      # asks twice
    evserver-ctl --data DIR account add --domain example --admin --password-file pw.txt root
    evserver-ctl --data DIR encoder add --domain example cam-1 --name "Front door"
    evserver-ctl --data DIR encoder list --json
    evserver-ctl --data DIR pool create east --servers SERVER-ID,SERVER-ID
    evserver-ctl --data DIR pool assign --encoder cam-1 east        # or --domain NAME
    evserver-ctl --data DIR server weight SERVER-ID 2
    evserver-ctl --data DIR server list

A pool names the servers that its encoders (and the encoders of its domains)
prefer over the balancer's choice; a server's weight is its capacity
relative to the others (1 by default).  Both are cluster-wide: a running
server sends the change to the others within seconds.  The servers a pool
or a weight names must be members of the cluster as this data directory
knows them (``server list``), unless ``--force`` is given.

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

from evserver.config import DEFAULT_DATA_DIR, load_or_create_server_id
from evserver.store import (
    DEFAULT_WEIGHT,
    Account,
    Domain,
    Encoder,
    Pool,
    Store,
    StoreError,
    validate_description,
    validate_pool_name,
    validate_pool_servers,
    validate_server_id,
    validate_weight,
)

PROG = "evserver-ctl"
ERROR_STATUS = 2


class CtlError(Exception):
    """An error to report as ``evserver-ctl: error: ...``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the domains, accounts, encoders, server pools and server weights "
                    "of an evserver data directory.",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"server data directory, created if missing (default: {DEFAULT_DATA_DIR})",
    )
    groups = parser.add_subparsers(dest="group",
                                   metavar="{domain,account,encoder,pool,server,msr}")
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

    pool = groups.add_parser(
        "pool", help="server pools: the servers some encoders prefer").add_subparsers(
        dest="command", metavar="{create,set,delete,list,assign}")
    pool.required = True
    p = pool.add_parser("create", help="create a pool of servers")
    p.add_argument("name")
    _pool_arguments(p, servers_required=True)
    p = pool.add_parser("set", help="change a pool's servers or description")
    p.add_argument("name")
    _pool_arguments(p, servers_required=False)
    p = pool.add_parser("delete", help="delete a pool no encoder or domain uses")
    p.add_argument("name")
    p = pool.add_parser("list", help="list pools")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = pool.add_parser("assign", help="give an encoder or a domain a pool, or none")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", metavar="ID", help="this encoder (its own pool)")
    which.add_argument("--domain", metavar="NAME",
                       help="this domain (for its encoders without a pool of their own)")
    p.add_argument("pool", nargs="?", metavar="POOL", help="the pool's name")
    p.add_argument("--none", action="store_true", help="no pool (instead of POOL)")

    server = groups.add_parser("server", help="the servers of the cluster").add_subparsers(
        dest="command", metavar="{list,weight}")
    server.required = True
    p = server.add_parser("list", help="list the servers with their weights and pools")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = server.add_parser("weight", help="set a server's capacity weight for balancing")
    p.add_argument("server_id", metavar="SERVER_ID")
    p.add_argument("weight", metavar="WEIGHT",
                   help="a number over 0 and up to 1000 (relative to the others), "
                        f"or 'default' ({DEFAULT_WEIGHT:g})")
    p.add_argument("--force", action="store_true",
                   help="even for a server this data directory does not know as a member")
    return parser


def _pool_arguments(parser: argparse.ArgumentParser, *, servers_required: bool) -> None:
    parser.add_argument("--servers", required=servers_required, metavar="ID,ID...",
                        help="the pool's server ids, comma separated, in order of preference")
    parser.add_argument("--description", help="what the pool is for")
    parser.add_argument("--force", action="store_true",
                        help="accept servers this data directory does not know as members")


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
                members = live.get("members", {})
                status["member_states"] = {sid: v.get("state") for sid, v in members.items()}
                status["member_mbps"] = {sid: v.get("mbps") for sid, v in members.items()}
                warnings = {sid: v.get("bandwidth_warnings") for sid, v in members.items()
                            if v.get("bandwidth_warnings")}
                if warnings:
                    status["bandwidth_warnings"] = warnings
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
        pools = {p.name for p in store.list_pools()}
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
            ("NAME", "ACCOUNTS", "ENCODERS", "POOL", "CREATED"),
            [
                (
                    d.name,
                    str(accounts.get(d.name, 0)),
                    str(encoders.get(d.name, 0)),
                    _pool_cell(d.pool, pools),
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
        pools = {p.name for p in store.list_pools()}
        self.table(
            ("ID", "NAME", "DOMAIN", "POOL", "CREATED"),
            [(e.encoder_id, e.name, e.domain, _pool_cell(e.pool, pools), _when(e.created))
             for e in encoders],
        )

    def encoder_delete(self, store: Store) -> None:
        store.delete_encoder(self.args.encoder_id)
        self.print(f"encoder {self.args.encoder_id!r} deleted")

    # -- pools and servers ----------------------------------------------------

    def known_servers(self) -> list[str]:
        """This server and the members of its cluster (DATA/cluster/members.json)."""
        from evserver.cluster.provision import _read_members

        data_dir = Path(self.args.data)
        own = load_or_create_server_id(data_dir)
        members = [str(m["server_id"]) for m in _read_members(data_dir)
                   if isinstance(m, dict) and m.get("server_id") and not m.get("removed")]
        return [own, *sorted(set(members) - {own})]

    def check_members(self, servers: Sequence[str]) -> None:
        if self.args.force:
            return
        known = self.known_servers()
        unknown = [s for s in servers if s not in known]
        if unknown:
            raise CtlError(
                f"{_names(unknown)} {'is not a member' if len(unknown) == 1 else 'are not members'}"
                f" of this server's cluster (known: {', '.join(known)}); "
                "see 'evserver-ctl server list', or give --force"
            )

    def servers_option(self) -> list[str] | None:
        text = self.args.servers
        if text is None:
            return None
        servers = [part.strip() for part in text.split(",")]
        if servers == [""]:
            raise CtlError("--servers: give at least one server id")
        return servers

    def pool_create(self, store: Store) -> None:
        servers = self.servers_option()
        assert servers is not None
        description = self.args.description if self.args.description is not None else ""
        # The store's own checks first: a malformed id is no unknown member.
        validate_pool_name(self.args.name)
        validate_pool_servers(servers)
        validate_description(description)
        self.check_members(servers)
        pool = store.create_pool(self.args.name, servers, description)
        self.print(f"pool {pool.name!r} created: {', '.join(pool.servers)}")

    def pool_set(self, store: Store) -> None:
        servers = self.servers_option()
        if servers is None and self.args.description is None:
            raise CtlError("nothing to change: give --servers, --description or both")
        if store.get_pool(self.args.name) is None:
            raise CtlError(f"no pool named {self.args.name!r}")
        if servers is not None:
            validate_pool_servers(servers)
            self.check_members(servers)
        pool = store.update_pool(self.args.name, servers=servers,
                                 description=self.args.description)
        self.print(f"pool {pool.name!r} changed: {', '.join(pool.servers)}")

    def pool_delete(self, store: Store) -> None:
        store.delete_pool(self.args.name)
        self.print(f"pool {self.args.name!r} deleted")

    def pool_list(self, store: Store) -> None:
        pools = store.list_pools()
        users = {p.name: store.pool_users(p.name) for p in pools}
        if self.args.json:
            self.dump([_pool_json(p, *users[p.name]) for p in pools])
            return
        self.table(
            ("NAME", "SERVERS", "ENCODERS", "DOMAINS", "DESCRIPTION"),
            [(p.name, ",".join(p.servers), str(len(users[p.name][0])),
              str(len(users[p.name][1])), p.description) for p in pools],
        )

    def pool_assign(self, store: Store) -> None:
        args = self.args
        if (args.pool is None) == (not args.none):
            raise CtlError("give either a POOL or --none")
        pool = None if args.none else args.pool
        if args.encoder is not None:
            store.set_encoder_pool(args.encoder, pool)
            what = f"encoder {args.encoder!r}"
        else:
            store.set_domain_pool(args.domain, pool)
            what = f"domain {args.domain!r}"
        if pool is None:
            self.print(f"{what} has no pool now")
        else:
            self.print(f"{what} now uses pool {pool!r}")

    def server_rows(self, store: Store) -> tuple[list[dict[str, Any]], str | None]:
        """Every member (this server first), then other servers a weight or a pool names;
        and when the running server last wrote its members' states (None: never)."""
        known = self.known_servers()
        weights = store.server_weights()
        pools: dict[str, list[str]] = {}
        for pool in store.list_pools():
            for server_id in pool.servers:
                pools.setdefault(server_id, []).append(pool.name)
        states: dict[str, Any] = {}
        states_at: str | None = None
        try:
            status = json.loads((Path(self.args.data) / "cluster" / "status.json")
                                .read_text("utf-8"))
            states = {str(sid): v.get("state") for sid, v in status.get("members", {}).items()}
            states_at = _iso(float(status.get("at", 0)))
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        load = self.load_status()
        loads = load.get("servers", {}) if isinstance(load.get("servers"), dict) else {}
        others = sorted((set(weights) | set(pools)) - set(known))
        rows = []
        for server_id in [*known, *others]:
            member = server_id in known
            if server_id == known[0]:
                state = "this server"
            elif not member:
                state = "not a member"
            else:
                state = str(states.get(server_id) or "unknown")
            rows.append({"server_id": server_id, "this": server_id == known[0],
                         "member": member, "state": state,
                         "weight": weights.get(server_id, DEFAULT_WEIGHT),
                         "pools": pools.get(server_id, []),
                         "load": loads.get(server_id)})
        return rows, states_at

    def load_status(self) -> dict[str, Any]:
        """What the running server last wrote of the cluster's load and its balancer
        (DATA/cluster/load.json, every 2 s); {} if nothing was written."""
        try:
            data = json.loads((Path(self.args.data) / "cluster" / "load.json")
                              .read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def server_list(self, store: Store) -> None:
        rows, states_at = self.server_rows(store)
        if self.args.json:
            self.dump(rows)
            return

        def figure(row: dict[str, Any], key: str, fmt: str = "{}") -> str:
            load = row.get("load")
            value = load.get(key) if isinstance(load, dict) else None
            return "-" if value is None else fmt.format(value)

        self.table(("SERVER", "STATE", "WEIGHT", "POOLS", "ENCODERS", "STREAMING", "VIEWERS",
                    "MBIT/S"),
                   [(r["server_id"], r["state"], f"{r['weight']:g}",
                     ",".join(r["pools"]) or "-", figure(r, "hosted"),
                     figure(r, "streaming"), figure(r, "viewers"),
                     figure(r, "mbps_out", "{:.1f}")) for r in rows])
        if states_at is not None:
            self.print(f"(states as the running server saw them at {states_at})")
        load = self.load_status()
        if load:
            self.print(f"balancer: decider {load.get('decider')}, moves resume in "
                       f"{load.get('stable_in_s')} s, {len(load.get('in_flight') or [])} "
                       f"in flight (load as of {_iso(float(load.get('at', 0)))})")
            for d in (load.get("decisions") or [])[-5:]:
                if isinstance(d, dict):
                    self.print(f"  {_iso(float(d.get('at', 0)))} {d.get('kind')} "
                               f"{d.get('encoder')} {d.get('from')} -> {d.get('to')}: "
                               f"{d.get('reason')}")

    def server_weight(self, store: Store) -> None:
        args = self.args
        if args.weight == "default":
            weight: float | None = None
        else:
            try:
                weight = float(args.weight)
            except ValueError:
                raise CtlError(f"weight {args.weight!r} is not a number "
                               "(or 'default')") from None
        validate_server_id(args.server_id)
        if weight is not None:  # (going back to the default is fine for any server)
            validate_weight(weight)
            self.check_members([args.server_id])
        store.set_server_weight(args.server_id, weight)
        shown = DEFAULT_WEIGHT if weight is None else weight
        self.print(f"server {args.server_id!r} weighs {shown:g}"
                   + (" (the default)" if weight is None else ""))


def _when(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _pool_cell(pool: str | None, pools: set[str]) -> str:
    """A pool reference as a table shows it (a pool deleted meanwhile counts as none)."""
    if pool is None:
        return "-"
    return pool if pool in pools else f"{pool} (no such pool)"


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _pool_json(p: Pool, encoders: list[str], domains: list[str]) -> dict[str, Any]:
    return {"name": p.name, "servers": list(p.servers), "description": p.description,
            "encoders": encoders, "domains": domains}


def _domain_json(d: Domain, accounts: int, encoders: int) -> dict[str, Any]:
    return {
        "name": d.name,
        "uid": d.uid,
        "pool": d.pool,
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
        "pool": e.pool,
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
