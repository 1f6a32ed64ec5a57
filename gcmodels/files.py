"""Files the project writes and the digests it keys them by: one way to publish a file or a folder
so that a crash never leaves it half-written, and one way to fingerprint settings and files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def json_digest(value: object, length: int | None = None) -> str:
    """SHA-256 of ``value`` as JSON with sorted keys (the same settings in any key order give the
    same digest), hex, cut to ``length`` characters."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(path: Path) -> None:
    # Makes the rename itself survive a power cut; some filesystems cannot sync a directory, and
    # the rename is atomic for running processes either way.
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def staged(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or, with ``directory``, folder) beside ``target``, on its filesystem, to
    write instead of it; when the block ends without an error it replaces ``target`` in one rename,
    so that readers see the old or the new one, never a part. Otherwise it is removed.

    A file is flushed to disk before the rename and gets the permissions a new file would have (a
    temporary file is private). Its name starts with ``.<name>.`` and ends with ``.partial``, so
    that a script collecting ``*.ckpt`` never picks one up. A folder replaces only a ``target``
    that does not exist or is empty (``os.replace``); an ``OSError`` says another one is there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(descriptor)
        staging = Path(name)
    try:
        yield staging
        if not directory:
            with staging.open("rb+") as handle:
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, target)
        _fsync_directory(target.parent)
    finally:
        if directory:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
