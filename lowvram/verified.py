"""Files whose sha256 was already checked, so that the next run does not hash its 16.7 GB again (~19 s at the
0.9 GB/s of one core here).

One record per file: its absolute path, size, mtime (ns), inode and the sha256 it matched. A file counts as verified
only while all of them still hold and the manifest still lists that sha256; a rewritten, replaced or touched file
is hashed again. The records live in the user cache (`LOWVRAM_CACHE_DIR`, else `~/.cache/lowvram`), replaced
atomically; a cache that cannot be read or written only costs the hashing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("LOWVRAM_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowvram"


def records_path() -> Path:
    return cache_root() / "verified-files.json"


def stamp(path: Path, sha256: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]


def _records() -> dict:
    try:
        return json.loads(records_path().read_text())
    except (OSError, ValueError):
        return {}


def is_verified(path: str | Path, sha256: str) -> bool:
    path = Path(path).resolve()
    try:
        return _records().get(str(path)) == stamp(path, sha256)
    except OSError:
        return False


def mark_verified(path: str | Path, sha256: str) -> None:
    """Remember that `path` hashed to `sha256` as it is now (called right after the check)."""
    path = Path(path).resolve()
    target = records_path()
    tmp = None
    try:
        records = _records()
        records[str(path)] = stamp(path, sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".verified-")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f)
        os.replace(tmp, target)
        tmp = None
    except OSError:
        pass  # read-only or full cache: the next run hashes again
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
