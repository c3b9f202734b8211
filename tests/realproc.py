"""Helpers for tests that run real processes: servers, tools, the demo.

The process machinery lives in :mod:`evserver.tools.procs` (the demo uses it
too); this module adds what tests need around it: why real tests must be
skipped, provisioning a data directory, and running a tool to completion.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from evserver.store import Store
from evserver.tools.procs import (
    Ports,
    ProcessError,
    ServerProcess,
    child_env,
    free_ports,
    spawn_tool,
    stop_process,
    tool_command,
    venv_script,
)

__all__ = [
    "REPO",
    "Ports",
    "ProcessError",
    "ServerProcess",
    "ToolResult",
    "child_env",
    "evserver_unavailable",
    "free_ports",
    "provision",
    "requires_evserver",
    "run_tool",
    "spawn_tool",
    "stop_process",
    "tool_command",
]

REPO = Path(__file__).resolve().parent.parent
#: Seconds any single tool run may take before the test fails.
TOOL_TIMEOUT = 60.0


def evserver_unavailable() -> str | None:
    """Why ``twistd evserver`` cannot run here, or None if it can."""
    twistd = venv_script("twistd")
    if not twistd.exists():
        return f"no twistd beside {sys.executable}"
    plugin = REPO / "twisted" / "plugins" / "evserver_plugin.py"
    if not plugin.exists():
        return f"the twistd plugin {plugin} does not exist yet"
    if importlib.util.find_spec("evserver.tap") is None:
        return "evserver.tap (the plugin's service maker) does not exist yet"
    return None


_REASON = evserver_unavailable()
#: Marks a test that needs ``twistd evserver``: real, and skipped with the reason if missing.
requires_evserver = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def provision(data_dir: Path, domains: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Create domains, accounts and encoders in a data directory; return the encoder secrets.

    ``domains`` maps a domain name to ``{"accounts": {name: password},
    "encoders": [ids]}``.  The server need not run (nor should it, for
    simplicity: the store is opened and closed here).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    secrets: dict[str, str] = {}
    with Store.in_data_dir(data_dir) as store:
        for domain, content in domains.items():
            store.add_domain(domain)
            for name, password in content.get("accounts", {}).items():
                store.add_account(domain, name, password)
            for encoder_id in content.get("encoders", ()):
                _, secrets[encoder_id] = store.add_encoder(domain, encoder_id)
    return secrets


@attrs.frozen
class ToolResult:
    status: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The last line of standard output that is a JSON object."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no JSON on stdout: {self.stdout!r} (stderr {self.stderr!r})")

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if ": error: " in line]


def run_tool(module: str, args: Sequence[str], timeout: float = TOOL_TIMEOUT,
             env: Mapping[str, str] | None = None) -> ToolResult:
    """Run ``python -m evserver.tools.<module> ARGS`` to completion."""
    done = subprocess.run(tool_command(module, *args), capture_output=True, text=True,
                          timeout=timeout, env=dict(env) if env is not None else child_env(),
                          stdin=subprocess.DEVNULL, check=False)
    return ToolResult(done.returncode, done.stdout, done.stderr)
