"""The twistd plugin is found from a NON-editable install in a fresh virtualenv.

A new venv (no system site-packages) gets evserver by ``pip install .`` from a
copy of the source tree.  To stay fast and offline it does not download the
dependencies again: it sees them through a ``.pth`` file pointing at a
directory of symbolic links to the running environment's site-packages, from
which every trace of evserver is left out (the package, its dist-info and
``twisted/plugins/evserver_plugin.py``).  So the only copy of the plugin the
new venv can find is the one pip installed; a control run before the install
shows twistd does not know ``evserver`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ITEMS = ("setup.cfg", "pyproject.toml", "README.rst", "evserver", "twisted")
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _is_ours(name: str) -> bool:
    return name.startswith(("evserver", "__editable__")) or name.endswith(".pth")


def _link_dependencies(site_packages: Path, deps: Path) -> None:
    """Mirror ``site_packages`` into ``deps`` with symlinks, leaving evserver out."""
    deps.mkdir()
    for entry in site_packages.iterdir():
        if _is_ours(entry.name) or entry.name == "__pycache__":
            continue
        if entry.name != "twisted":
            (deps / entry.name).symlink_to(entry)
            continue
        twisted = deps / "twisted"
        twisted.mkdir()
        for sub in entry.iterdir():
            if sub.name != "plugins":
                (twisted / sub.name).symlink_to(sub)
        plugins = twisted / "plugins"
        plugins.mkdir()
        for plugin in (entry / "plugins").iterdir():
            if plugin.name in ("evserver_plugin.py", "dropin.cache", "__pycache__"):
                continue
            (plugins / plugin.name).symlink_to(plugin)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_NO_INDEX"] = "1"  # nothing may come from the network
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _build_backend_missing() -> str | None:
    """Why this environment cannot build evserver offline, or None if it can."""
    try:
        setuptools_version = metadata.version("setuptools")
        metadata.version("wheel")
    except metadata.PackageNotFoundError as e:
        return f"{e.name} is not installed (make test installs it into .venv)"
    if int(setuptools_version.split(".")[0]) < 68:
        return f"setuptools {setuptools_version} < 68 (make test installs a newer one)"
    return None


def test_plugin_found_after_non_editable_install(tmp_path: Path) -> None:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    if not (site_packages / "twisted").is_dir():
        pytest.skip(f"Twisted is not installed in {site_packages}")
    reason = _build_backend_missing()
    if reason is not None:
        pytest.skip(reason)

    source = tmp_path / "src"
    source.mkdir()
    for item in SOURCE_ITEMS:
        origin = ROOT / item
        if origin.is_dir():
            shutil.copytree(
                origin, source / item, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache")
            )
        else:
            shutil.copy2(origin, source / item)

    deps = tmp_path / "deps"
    _link_dependencies(site_packages, deps)

    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    venv_site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
        ).stdout.strip()
    )
    (venv_site / "_evserver_test_deps.pth").write_text(f"{deps}\n")

    work = tmp_path / "work"  # neutral directory: no checkout on sys.path
    work.mkdir()

    # Control: without the install, twistd in this venv knows no evserver.
    before = _run([str(python), "-c", TWISTD, "evserver", "--help"], work)
    assert "--encoder-port" not in before.stdout
    assert "Unknown command: evserver" in before.stdout + before.stderr

    installed = _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            str(source),
        ],
        work,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # Installed as files, not as an editable hook; never a twisted/__init__.py.
    plugin = venv_site / "twisted" / "plugins" / "evserver_plugin.py"
    assert plugin.is_file()
    assert not (venv_site / "twisted" / "__init__.py").exists()
    assert not (venv_site / "twisted" / "plugins" / "__init__.py").exists()
    assert (venv_site / "evserver" / "tap.py").is_file()
    assert not list(venv_site.glob("__editable__*"))

    where = _run(
        [str(python), "-c", "import twisted.plugins.evserver_plugin as m; print(m.__file__)"],
        work,
    )
    assert Path(where.stdout.strip()) == plugin, where.stderr

    after = _run([str(python), "-c", TWISTD, "evserver", "--help"], work)
    assert after.returncode == 0, after.stderr
    assert "--encoder-port" in after.stdout
    assert "--plain" in after.stdout

    ctl = _run([str(venv / "bin" / "evserver-ctl"), "--help"], work)
    assert ctl.returncode == 0, ctl.stderr
    assert "domain" in ctl.stdout
