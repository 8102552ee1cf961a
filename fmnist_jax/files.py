"""Writing files so that a crash never leaves half of one, and others can read them.

:func:`atomic_open` writes to a temporary name in the same directory, flushes it to disk
and renames it over the target only when the block succeeds. The temporary file is created
with mode 0666 filtered by the process's umask, exactly as ``open(path, "w")`` would (0644
under the usual umask 022), not 0600 as ``tempfile.mkstemp`` makes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text) or ``"wb"``; the file's ``name`` is the temporary path (to
    check what was written before it takes the real name). On an exception nothing is left
    behind and the old ``path``, if any, is unchanged.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
    exclusive = lambda name, flags: os.open(name, flags | os.O_EXCL, 0o666)  # noqa: E731
    try:  # 0o666 & ~umask, like open(); ``f.name`` is the temporary path
        with open(tmp, mode, opener=exclusive) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as f:
        f.write(json.dumps(clean(obj), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes ``records`` one per line, atomically (replacing the file)."""
    with atomic_open(path) as f:
        f.write("".join(json.dumps(clean(r)) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
