"""Turning a server into a cluster member, on disk.

``enable`` makes a standalone server a cluster of one (R10): the running
server notices the new identity within a couple of seconds and starts its
cluster service, keeping its data and its clients.  ``provision_member``
admits another server whose data directory is on the same machine (a local
cluster, the tests): it signs that server's certificate with the cluster
authority and tells it one member's peer address; the rest of the member
list comes over the peer protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from evserver.cluster.ca import (
    ClusterError,
    ClusterIdentity,
    Now,
    cluster_dir,
    create_cluster,
    install_membership,
    load_identity,
    make_csr,
    sign_csr,
)
from evserver.config import load_or_create_server_id

MEMBERS_FILE = "members.json"


def _write_members(data_dir: Path, members: list[dict[str, object]]) -> None:
    path = cluster_dir(data_dir) / MEMBERS_FILE
    tmp = path.with_name(f".{MEMBERS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(members, indent=1), encoding="utf-8")
    tmp.replace(path)


def _read_members(data_dir: Path) -> list[dict[str, object]]:
    try:
        data = json.loads((cluster_dir(data_dir) / MEMBERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def enable(data_dir: Path, hostnames: Sequence[str], now: Now) -> ClusterIdentity:
    """Make this (standalone) server a cluster of one; refuse if it already is a member."""
    server_id = load_or_create_server_id(data_dir)
    identity = create_cluster(data_dir, server_id, list(hostnames), now)
    _write_members(data_dir, [])
    return identity


def peer_address_entry(server_id: str, peer_host: str, peer_port: int) -> dict[str, object]:
    """A members.json entry that knows only where to reach the member's peer port."""
    return {"server_id": server_id, "incarnation": 0,
            "address": {"host": peer_host, "encoder_port": 0, "viewer_port": 0,
                        "relay_port": 0, "admin_port": 0, "peer_host": peer_host,
                        "peer_port": peer_port}}


def provision_member(existing_data_dir: Path, existing_peer: tuple[str, int],
                     new_data_dir: Path, hostnames: Sequence[str],
                     now: Now) -> ClusterIdentity:
    """Admit the server of ``new_data_dir`` into the cluster of ``existing_data_dir``."""
    existing = load_identity(existing_data_dir)
    if existing is None:
        raise ClusterError(f"{existing_data_dir} is not a cluster member: "
                           f"run 'evserver-ctl --data {existing_data_dir} msr enable' first")
    if existing.ca_key is None:
        raise ClusterError(f"{existing_data_dir} holds no cluster authority key")
    new_data_dir.mkdir(parents=True, exist_ok=True)
    new_id = load_or_create_server_id(new_data_dir)
    if new_id == existing.server_id:
        raise ClusterError("both data directories have the same server id")
    key, csr = make_csr(new_id, list(hostnames))
    certificate = sign_csr(existing, csr, new_id, list(hostnames), now)
    identity = install_membership(new_data_dir, existing.cluster_id, existing.ca_cert,
                                  existing.ca_key, key, certificate)
    _write_members(new_data_dir, [peer_address_entry(existing.server_id, *existing_peer)])
    return identity
