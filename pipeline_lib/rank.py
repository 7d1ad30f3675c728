"""One rank of a training stage on several processes: ``python -m pipeline_lib.rank REQUEST``.

``accelerate launch`` starts this module on every rank (``pipeline_lib/distributed.py``
builds the command and reads the outcome). It runs the stage's ordinary ``run`` and
reports back through files in the stage's ``launch/`` directory: rank 0 its metrics, a
rank that raises its message. Rank 0's log records go to standard output, one JSON
object per line, for the parent to re-emit. A module of its own, so that what the stages
import (``pipeline_lib.distributed``) does not import the registry of every stage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline_lib import cores, registry
from pipeline_lib.config import PipelineConfig
from pipeline_lib.distributed import FLOW_PID_VARIABLE, LAUNCH_DIR, LOG_PREFIX, RESULT_FILE, world_size
from pipeline_lib.errors import PipelineError
from pipeline_lib.launch import end_with, registered


class _StdoutRecords(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = {"name": record.name, "level": record.levelno, "message": record.getMessage()}
            if isinstance(getattr(record, "progress", None), dict):
                payload["progress"] = record.progress
            if record.exc_info:
                payload["message"] += "\n" + "".join(traceback.format_exception(*record.exc_info))
            sys.stdout.write(LOG_PREFIX + json.dumps(payload) + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never end a rank
            self.handleError(record)


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    rank, stage_name = int(os.environ.get("RANK", "0")), request["stage"]
    flow_pid = os.environ.get(FLOW_PID_VARIABLE)
    if flow_pid:
        end_with(int(flow_pid))
    project_logger = logging.getLogger("pipeline_lib")
    project_logger.handlers[:] = [_StdoutRecords()]
    project_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    project_logger.propagate = False
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    out_dir, launch_dir = Path(request["out_dir"]), Path(request["out_dir"]) / LAUNCH_DIR
    try:
        config = PipelineConfig.model_validate(request["config"])
        stage = registry.stage(stage_name)
        # This rank's part of the stage's threads, set by the parent (run_stage_distributed).
        threads_of_rank = cores.granted(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with registered(request["running_dir"], f"{stage_name}-rank{rank}"), threads_of_rank as threads:
            project_logger.info("%s: rank %d of %d, process %d (%d torch threads)", stage_name, rank, world_size(), os.getpid(), threads)
            metrics = stage.run(config, {name: Path(path) for name, path in request["inputs"].items()}, out_dir)
        if rank == 0:
            metrics = {**metrics, "world_size": world_size(), "accelerate_config": config.launch.accelerate_config}
            (launch_dir / RESULT_FILE).write_text(json.dumps(metrics))
    except BaseException as error:
        message = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
        project_logger.error("%s failed on rank %d:\n%s", stage_name, rank, traceback.format_exc())
        (launch_dir / f"rank-{rank}.error.json").write_text(
            json.dumps({"rank": rank, "error": message, "time": time.time(), "traceback": traceback.format_exc()})
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1])
