"""Atomic writes and checksums: a kill at any moment leaves a file its checksum vouches for; leftovers of killed
writers are removed, and only they."""

import os

import pytest

from nanosae import fileio
from nanosae.errors import NanosaeError
from nanosae.fileio import atomic_write, checksum_path, remove_leftovers, verify_sha256


def _write(path, data: bytes):
    return atomic_write(path, lambda f: f.write(data), checksum=True)


def test_checksum_is_written_beside_and_verified(tmp_path):
    p = _write(tmp_path / "state.pt", b"first")
    assert checksum_path(p).read_text().split() == [fileio.sha256_file(p), "state.pt"]  # sha256sum's format
    verify_sha256(p, "fix it")
    _write(p, b"second")
    verify_sha256(p, "fix it")
    assert len(checksum_path(p).read_text().splitlines()) == 1  # only the file in place is vouched for
    p.write_bytes(b"secand")
    with pytest.raises(NanosaeError, match=r"state.pt: damaged \(its sha256 differs from the one in state.pt.sha256"):
        verify_sha256(p, "fix it")
    checksum_path(p).unlink()
    with pytest.raises(NanosaeError, match=r"no checksum .*; fix it"):
        verify_sha256(p, "fix it")
    verify_sha256(p, "fix it", expected=fileio.sha256_file(p))  # a digest kept elsewhere (a folder's manifest)
    p.unlink()
    with pytest.raises(NanosaeError, match=r"state.pt: missing; fix it"):
        verify_sha256(p, "fix it", expected="0" * 64)


@pytest.mark.parametrize("where", ["before the rename", "after the rename"])
def test_a_kill_during_a_checksummed_write_leaves_a_trusted_file(tmp_path, monkeypatch, where):
    p = _write(tmp_path / "state.pt", b"old")
    real_replace, real_checksums = os.replace, fileio._write_checksums
    calls = []

    def checksums(path, digests):
        calls.append(digests)
        if where == "after the rename" and len(calls) == 2:
            raise KeyboardInterrupt  # killed between the rename and the final checksum
        real_checksums(path, digests)

    def replace(src, dst):
        if where == "before the rename" and str(dst) == str(p):
            raise KeyboardInterrupt  # killed after the checksums, before the file is renamed
        real_replace(src, dst)

    monkeypatch.setattr(fileio, "_write_checksums", checksums)
    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == (b"old" if where == "before the rename" else b"new")
    verify_sha256(p, "fix it")  # either way the file in place is vouched for
    _write(p, b"newer")
    verify_sha256(p, "fix it")


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = tmp_path / ".shard.safetensors.999999999.k2_xyz0a.tmp"  # pid 999999999: no such process
    alive = tmp_path / f".shard.safetensors.{os.getpid()}.k2_xyz0a.tmp"
    user = [tmp_path / n for n in (".notes.tmp", ".a.999999999.tmp", ".b.999999999.toolong12.tmp", "x.1.abcdefgh.tmp")]
    for f in [dead, alive, *user]:
        f.write_text("x")
    assert remove_leftovers(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and all(f.exists() for f in user)


def test_any_writer_sweeps_a_folder_on_its_first_write_there(tmp_path):
    from nanosae.fileio import atomic_write_json

    folder = tmp_path / "feature_stats"  # e.g. a viz killed while saving its statistics
    folder.mkdir()
    dead = folder / ".stats.safetensors.999999999.abcdefgh.tmp"
    dead.write_bytes(b"half")
    (folder / ".keep.tmp").write_text("user file")
    atomic_write_json(folder / "key.json", {"any": "write"})
    assert not dead.exists() and (folder / ".keep.tmp").exists()
