"""Can we write there? One probe (create and remove a temporary file) that every output and cache folder uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be created in `folder` (made on demand), or None when they can.

    The folder need not exist: the nearest existing ancestor is probed, since that is where it would be made. A
    real create-and-delete is the only honest test (`os.access` ignores read-only mounts for root, ACLs, quotas).
    """
    path = Path(folder)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            return "is a file, not a folder"
        return f"cannot be created: {existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".loha-write-probe-", dir=existing)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = "" if existing == path else f" (its nearest existing parent {existing})"
        return f"cannot be written{where}: {reason}"
    os.close(fd)
    os.unlink(probe)
    return None
