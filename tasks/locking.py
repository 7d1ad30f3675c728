"""File locks for stage keys that die with the process holding them.

Prefect's ``FileSystemLockManager`` keeps a lock until its holder releases it or its
hold timeout passes. A stage holds its key's lock for as long as it trains (minutes to
hours), so no timeout fits; and a run that is killed mid-stage never releases it, so
the re-run that should resume the stage would wait forever. This subclass records the
holding process in the lock file and treats a lock whose process is gone (on this
host) as released, and so is a lock file left empty, unreadable or without a holder by
a process killed while taking it (after a short grace): no lock state can wedge a rerun.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager

from pipeline_lib.cores import process_alive


# Prefect creates a lock file empty and writes it an instant later, and we add the pid an
# instant after that; a lock file still empty, unreadable or without a pid after this long
# was left by a process killed in between, and is stale.
UNFINISHED_LOCK_GRACE_SECONDS = 10.0


def _read_lock(path: Path) -> dict | None:
    """The lock file's record: None if there is no lock file, {} if it is unreadable."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_stale(path: Path, record: dict) -> bool:
    pid, host = record.get("pid"), record.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        return not process_alive(pid)
    if pid is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > UNFINISHED_LOCK_GRACE_SECONDS
    return False  # held by a process on another host: only its own host can tell


class ProcessBoundLockManager(FileSystemLockManager):
    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: Optional[float] = None, hold_timeout: Optional[float] = None
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = Path(self._lock_path_for_key(key))
            record = _read_lock(path) or {"holder": holder, "expiration": None}
            record.update({"pid": os.getpid(), "host": socket.gethostname()})
            # Write then rename: a reader never sees a half-written record.
            staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            staging.write_text(json.dumps(record))
            os.replace(staging, path)
        return acquired

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            return super()._get_lock_info(key, use_cache)
        except (ValueError, TypeError):  # not JSON, or JSON that is not an object
            # Being written this instant (or left unreadable; ``is_locked`` expires those).
            return {"holder": None, "expiration": None, "path": self._lock_path_for_key(key)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        record = _read_lock(path)
        if record is None:
            self._locks.pop(key, None)
            return False
        if _is_stale(path, record):
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache)
