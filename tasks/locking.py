"""File locks for stage keys that die with the process holding them.

Prefect's ``FileSystemLockManager`` keeps a lock until its holder releases it or its
hold timeout passes. A stage holds its key's lock for as long as it trains (minutes to
hours), so no timeout fits; and a run that is killed mid-stage never releases it, so
the re-run that should resume the stage would wait forever. This subclass records the
holding process in the lock file and treats a lock whose process is gone (on this
host) as released.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager

from pipeline_lib.cores import process_alive


class ProcessBoundLockManager(FileSystemLockManager):
    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: Optional[float] = None, hold_timeout: Optional[float] = None
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = self._lock_path_for_key(key)
            record = json.loads(Path(path).read_bytes())
            record.update({"pid": os.getpid(), "host": socket.gethostname()})
            Path(path).write_text(json.dumps(record))
        return acquired

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        try:
            record = json.loads(path.read_bytes() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            record = {}
        pid, host = record.get("pid"), record.get("host")
        if pid is not None and host == socket.gethostname() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache)
