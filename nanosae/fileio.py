"""Atomic file writes (temp file in the same folder, fsync, rename) and checksums, shared by every writer.

A temp file is named `.<name>.<pid>.<random>.tmp`; the first atomic write of a process into a folder deletes the
temp files that writers killed mid-write (their pid gone) left there, and nothing else. A file nanosae reads back
to continue work gets `checksum=True`: a `<name>.sha256` beside it (sha256sum's format) that `verify_sha256`
checks before the file is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from .errors import NanosaeError

_UMASK = os.umask(0)
os.umask(_UMASK)
# mkstemp's name: prefix, 8 characters from [a-z0-9_], suffix
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")
_swept: set[Path] = set()  # folders whose leftovers this process has already deleted


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process can have: keep what we cannot judge)
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of atomic writes whose process is gone (killed mid-write); returns them."""
    gone = []
    for p in Path(folder).glob(".*.tmp"):
        m = _TEMP.fullmatch(p.name)
        if m and not pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], checksum: bool = False) -> Path:
    """Call write(f) on a temp file beside `path`, then rename it over `path`: readers never see a partial file.
    With checksum, `<name>.sha256` records the new file's sha256; while the rename is in flight it lists the old
    file's too, so a kill at any moment leaves a file its checksum vouches for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if (folder := path.parent.absolute()) not in _swept:
        remove_leftovers(folder)
        _swept.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            digest = sha256_file(tmp)
            old = _recorded(checksum_path(path)) if path.exists() else []
            _write_checksums(path, [digest, *old])
        os.replace(tmp, path)
        if checksum:
            _write_checksums(path, [digest])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, checksum: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), checksum)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, checksum: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n", checksum)


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hex sha256 of a file (of its first `limit` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- checksums


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _recorded(side: Path) -> list[str]:
    try:
        return [line.split()[0] for line in side.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return []


def _write_checksums(path: Path, digests: list[str]) -> None:
    atomic_write_text(checksum_path(path), "".join(f"{d}  {path.name}\n" for d in digests))


def verify_sha256(path: str | os.PathLike, remedy: str, expected: str | None = None) -> None:
    """Raise a one-line NanosaeError naming `path` and `remedy` unless the file's sha256 is `expected` or, without
    it, one that `<name>.sha256` beside it records. Nothing is changed on disk either way."""
    path = Path(path)
    if not path.is_file():
        raise NanosaeError(f"{path}: missing; {remedy}")
    side = checksum_path(path)
    recorded = [expected] if expected is not None else _recorded(side)
    if not recorded:
        raise NanosaeError(f"{path}: no checksum ({side.name} is missing or unreadable) to trust it by; {remedy}")
    if sha256_file(path) not in recorded:
        where = "the one recorded" if expected is not None else f"the one in {side.name}"
        raise NanosaeError(f"{path}: damaged (its sha256 differs from {where}); {remedy}")


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) onto the CPU: tensors and plain containers, never code. A file it cannot read
    is a one-line NanosaeError; a pickle that asks for a class is refused, not run."""
    try:
        # no mmap: tensors backed by the file would crash the process (SIGBUS) if the file were rewritten
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if m := re.search(r"Unsupported global: GLOBAL (\S+)", msg):
            raise NanosaeError(
                f"{path}: refused: the pickle asks for {m[1]} besides tensors (nanosae loads weights only)"
            ) from None
        plain = "Weights only load failed" in msg or "zip archive" in msg or "invalid load key" in msg
        # damaged bytes fail in many ways inside the unpickler (EOFError, IndexError, ...): all of them mean the same
        first = msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__
        detail = ")" if plain else f"; {first})"
        raise NanosaeError(
            f"{path}: not a readable torch checkpoint (corrupt or truncated? copy it again{detail}"
        ) from None
