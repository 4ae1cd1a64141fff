"""Model archives: safe extraction (tar-slip, links, bombs) and reproducible, atomic writing."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from helpers.domain.archives import safe_extract, write_tar_gz


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extraction_refuses_escapes_links_and_bombs(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", [_file("pytorch_lora_weights.safetensors", b"x" * 10)])
    out = safe_extract(good, tmp_path / "good")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"x" * 10

    link = tarfile.TarInfo("weights")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases = {
        "absolute": [_file("/tmp/evil", b"x")],
        "parent": [_file("../evil", b"x")],
        "nested-parent": [_file("a/../../evil", b"x")],
        "link": [(link, None)],
    }
    for name, members in cases.items():
        with pytest.raises(ValueError, match="refusing"):
            safe_extract(_tar(tmp_path / f"{name}.tar.gz", members), tmp_path / name)
        assert not any((tmp_path / name).iterdir())
    big = _tar(tmp_path / "big.tar.gz", [_file("a", b"0" * 600), _file("b", b"0" * 600)])
    with pytest.raises(ValueError, match="bytes unpacked"):
        safe_extract(big, tmp_path / "big", max_bytes=1000)
    assert not (tmp_path.parent / "evil").exists()


def test_too_many_members_are_refused(tmp_path):
    many = _tar(tmp_path / "many.tar.gz", [_file(f"f{i}", b"") for i in range(5)])
    with pytest.raises(ValueError, match="5 members, at most 4"):
        safe_extract(many, tmp_path / "many", max_members=4)


def test_written_archives_are_reproducible_and_round_trip(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01" * 100)
    files = {"m/config.pbtxt": "backend: 1", "m/1/weights.bin": source, "m/1/raw": b"abc"}
    first = write_tar_gz(tmp_path / "a" / "model.tar.gz", files)
    second = write_tar_gz(tmp_path / "b" / "model.tar.gz", files)
    assert first.read_bytes() == second.read_bytes()
    out = safe_extract(first, tmp_path / "out")
    assert (out / "m" / "1" / "weights.bin").read_bytes() == source.read_bytes()
    assert (out / "m" / "config.pbtxt").read_text() == "backend: 1"
    assert [p.name for p in first.parent.iterdir()] == ["model.tar.gz"]  # no temp file left


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_tar_gz(tmp_path / "model.tar.gz", {"a": tmp_path / "missing"})
    assert list(tmp_path.iterdir()) == []
