"""Run one training stage on several processes with ``accelerate launch``.

With ``launch.num_processes > 1`` a training stage does not run in the fork-server child
of ``pipeline_lib/launch.py`` but under ``accelerate launch`` (which starts torch's
elastic agent, ``torchrun``, for DDP and FSDP, or DeepSpeed's launcher), in a subprocess
of the stage's task. Every rank runs the stage's ordinary ``run``: TRL's trainers
shard the batches, all-reduce the gradients and save checkpoints from rank 0 by
themselves, and the stage's own writes (the published model, the loss log, the rescued
model) go through ``is_main_process``. No training code of ours is specific to several
processes; the engines are accelerate's, torch's and DeepSpeed's.

* **Outcome.** Rank 0 writes ``launch/result.json`` (the stage's metrics, plus the world
  size and the engine) in the stage's work directory; the task publishes from it as for
  one process. A rank that raises writes ``launch/rank-<r>.error.json``; the elastic agent
  then ends the other ranks, and the stage fails with that rank's message. A rank that is
  killed (out of memory, by hand) leaves no message: the stage fails naming the exit
  status. Nothing is published either way; the next run resumes from the newest trainer
  checkpoint, as with one process.
* **Logs.** Rank 0's ``pipeline_lib`` log records come back over standard output, one per
  line, and are re-emitted by the parent (and so reach the Prefect UI); the other ranks
  log warnings only. The trainers' progress bars pass through on standard error.
* **Cores.** Each rank registers with ``pipeline_lib.cores`` as ``<stage>-rank<r>``, so the
  machine's cores are shared between ranks and with stages running beside them.
* **Engines.** ``launch.accelerate_config`` names one of the configs shipped in
  ``pipeline_lib/accelerate_configs`` (``ddp``, ``fsdp``, ``zero2``, ``zero3``, adapted
  from TRL's) or a YAML file of the user's. ``num_processes`` and the mixed precision
  are passed on the command line, so they follow the pipeline's config.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from pipeline_lib import progress
from pipeline_lib.config import ACCELERATE_CONFIGS, PipelineConfig
from pipeline_lib.errors import ConfigError, StageFailed

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "accelerate_configs"
LAUNCH_DIR = "launch"  # inside the stage's work directory; scratch, never published
RESULT_FILE = "result.json"
FLOW_PID_VARIABLE = "RLHF_FLOW_PID"
LOG_PREFIX = "@rlhf-log "  # marks the log records rank 0 sends back on standard output
_live: set[subprocess.Popen] = set()  # launchers running now, for stop_all


# ---------------------------------------------------------------- settings


def config_file(config: PipelineConfig) -> Path:
    """The accelerate config file ``launch.accelerate_config`` names."""
    name = config.launch.accelerate_config
    return CONFIG_DIR / f"{name}.yaml" if name in ACCELERATE_CONFIGS else Path(name).expanduser()


def accelerate_settings(config: PipelineConfig) -> dict[str, Any]:
    """The configured accelerate config file, read and checked to be one."""
    import yaml

    path = config_file(config)
    if not path.is_file():
        known = ", ".join(ACCELERATE_CONFIGS)
        raise ConfigError(
            f"launch.accelerate_config: {config.launch.accelerate_config!r} is neither one of {known} nor an existing "
            "accelerate config file"
        )
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"launch.accelerate_config: {path} is not valid YAML: {error}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("distributed_type"), str):
        raise ConfigError(f"launch.accelerate_config: {path} is not an accelerate config (no distributed_type)")
    return settings


def engine(config: PipelineConfig) -> str:
    """accelerate's ``distributed_type`` for the configured engine (MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    return accelerate_settings(config)["distributed_type"].upper()


def check_launch(config: PipelineConfig, cuda_devices: int, cpu_cores: int, deepspeed_installed: bool) -> None:
    """``launch`` against a machine with ``cuda_devices`` GPUs and ``cpu_cores`` cores; raises
    ConfigError naming the setting. One process needs nothing."""
    processes = config.launch.num_processes
    if processes == 1 and config.launch.accelerate_config == "ddp":
        return
    settings = accelerate_settings(config)
    kind = settings["distributed_type"].upper()
    if processes == 1:
        return
    if kind in ("FSDP", "DEEPSPEED"):
        if cuda_devices == 0:
            raise ConfigError(
                f"launch.accelerate_config: {config.launch.accelerate_config!r} ({kind}) needs CUDA GPUs and this "
                "machine has none; use 'ddp' (data parallel on CPU cores)"
            )
        if kind == "DEEPSPEED" and not deepspeed_installed:
            raise ConfigError(
                f"launch.accelerate_config: {config.launch.accelerate_config!r} needs DeepSpeed: pip install deepspeed"
            )
        lora = [name for name, section in config.train_sections().items() if section.adapter == "lora"]
        sharded = kind == "FSDP" or (settings.get("deepspeed_config") or {}).get("zero_stage") == 3
        if lora and sharded:
            raise ConfigError(
                f"launch.accelerate_config: {config.launch.accelerate_config!r} shards the weights, and publishing a "
                f"sharded LoRA model is not supported yet ({', '.join(lora)} use adapter: lora); use 'ddp' or 'zero2'"
            )
    elif kind not in ("MULTI_GPU", "MULTI_CPU", "NO"):
        raise ConfigError(f"launch.accelerate_config: distributed_type {kind} is not supported (ddp, fsdp, zero2, zero3)")
    devices, what = (cuda_devices, "CUDA GPUs") if cuda_devices else (cpu_cores, "CPU cores")
    if processes > devices:
        raise ConfigError(f"launch.num_processes: {processes} is more than the {devices} {what} of this machine")


def check_launch_here(config: PipelineConfig) -> None:
    """``launch`` against this machine (one process: the names only, without importing torch)."""
    import importlib.util

    if config.launch.num_processes == 1:
        check_launch(config, 0, os.cpu_count() or 1, False)
        return
    import torch

    check_launch(
        config,
        torch.cuda.device_count() if torch.cuda.is_available() else 0,
        os.cpu_count() or 1,
        importlib.util.find_spec("deepspeed") is not None,
    )


def is_main_process() -> bool:
    """Whether this process writes the stage's outputs: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def sharded_weights() -> bool:
    """Whether this rank holds only a shard of the weights: FSDP, or DeepSpeed ZeRO-3 (the
    variables ``accelerate launch`` sets for the ranks it starts)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, the other ranks after it (to read what it wrote).
    One process: just the block."""
    if world_size() == 1:
        yield
        return
    import torch
    from accelerate import PartialState

    # The same device choice as the trainers' ``use_cpu`` (training.trainer_args): the
    # state is process-wide and the trainer's Accelerator reuses it.
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        yield


def shared_dataset(dataset, directory: Path):
    """On several processes: ``dataset`` saved to ``directory`` by rank 0 and read back by
    every rank, so that the cache files a trainer derives from it are one set on disk for
    all ranks. TRL's DPO precomputes the reference log-probs on rank 0 into a cache file
    next to the dataset's own and reads it back on every rank; an in-memory dataset's
    cache files live in a per-process temporary directory the other ranks cannot see.
    One process: ``dataset`` unchanged."""
    if world_size() == 1:
        return dataset
    from datasets import load_from_disk

    with main_process_first():
        if is_main_process():
            dataset.save_to_disk(str(directory))
        return load_from_disk(str(directory))


# ---------------------------------------------------------------- the parent's side


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(config: PipelineConfig, request: Path) -> list[str]:
    """``accelerate launch`` running every rank of one stage."""
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file(config)),
        "--num_processes", str(config.launch.num_processes),
        "--num_machines", "1",
        "--main_process_port", str(_free_port()),
        "--mixed_precision", precision,
        "-m", "pipeline_lib.rank", str(request),
    ]  # fmt: skip


def _forward(stream, on_progress=None) -> None:
    """Re-emit rank 0's log records in this process (their progress to ``on_progress``);
    pass anything else through as a line."""
    for line in stream:
        line = line.rstrip("\n")
        if line.startswith(LOG_PREFIX):
            try:
                payload = json.loads(line[len(LOG_PREFIX):])
                extra = {"progress": payload["progress"]} if "progress" in payload else None
                record = logging.getLogger(payload["name"]).makeRecord(
                    payload["name"], payload["level"], "(rank 0)", 0, "%s", (payload["message"],), None, extra=extra
                )
                logging.getLogger(payload["name"]).handle(record)
                progress.forward(record, on_progress)
                continue
            except (ValueError, KeyError, TypeError):
                pass
        if line.strip():
            logger.info("%s", line)


def _pass_through(stream, tail: deque) -> None:
    """The launcher's standard error (progress bars, warnings, the elastic agent's failure
    summary) to this process's, keeping its last lines to read the failure summary from."""
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


def _killed_rank(stderr_tail: list[str]) -> tuple[int, str] | None:
    """The rank the elastic agent saw die of a signal, and the signal, from its failure
    summary: its "Root Cause (first observed failure)" entry, ``rank : 1 (local_rank: 1)``
    then ``exitcode : -9 (pid: ...)`` (the ranks the agent then ended, by SIGTERM, come before it)."""
    text = "".join(stderr_tail)
    text = text[text.rfind("Root Cause"):] if "Root Cause" in text else text
    for rank, exitcode in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-\d+)", text):
        try:
            return int(rank), signal.Signals(-int(exitcode)).name
        except ValueError:
            continue
    return None


def _rank_errors(launch_dir: Path) -> list[dict[str, Any]]:
    errors = []
    for path in launch_dir.glob("rank-*.error.json"):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(errors, key=lambda error: (error.get("time", 0), error.get("rank", 0)))


def run_stage_distributed(
    stage_name: str,
    config_json: dict[str, Any],
    inputs: dict[str, Path],
    out_dir: Path,
    running_dir: Path | None = None,
    threads: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``registry.stage(stage_name).run`` on ``launch.num_processes`` processes; return rank 0's metrics.
    The ranks split ``threads`` (the plan's for the stage, pipeline_lib/cores.py, or the CPUs
    Ray granted), else this machine's cores; each registers in ``running_dir`` as
    ``<stage>-rank<i>.<pid>`` (``launch.registered``).

    Raises ``StageFailed`` naming the stage, with the message of the rank that failed first,
    or the launcher's exit status when no rank could say."""
    config = PipelineConfig.model_validate(config_json)
    launch_dir = Path(out_dir) / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    for old in [*launch_dir.glob("rank-*.error.json"), launch_dir / RESULT_FILE]:
        old.unlink(missing_ok=True)  # an earlier attempt's outcome says nothing of this one
    request = launch_dir / "request.json"
    request.write_text(json.dumps({
        "stage": stage_name, "config": config_json, "inputs": {name: str(path) for name, path in inputs.items()},
        "out_dir": str(out_dir), "running_dir": None if running_dir is None else str(running_dir),
    }))  # fmt: skip
    processes = config.launch.num_processes
    environment = {**os.environ, FLOW_PID_VARIABLE: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    # torchrun pins every rank to one thread unless OMP_NUM_THREADS is set; give each its share.
    if threads is not None:  # the stage's threads, split between the ranks
        environment["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    logger.info("%s: launching %d processes (%s, %s)", stage_name, processes, config.launch.accelerate_config, engine(config))
    process = subprocess.Popen(
        launch_command(config, request), env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    _live.add(process)
    stderr_tail: deque = deque(maxlen=400)
    # The log reader runs in this thread's context, so Prefect files the records under this task run.
    in_this_context = contextvars.copy_context().run
    readers = [
        threading.Thread(target=in_this_context, args=(_forward, process.stdout, on_progress), name=f"logs-{stage_name}", daemon=True),
        threading.Thread(target=_pass_through, args=(process.stderr, stderr_tail), name=f"stderr-{stage_name}", daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        while process.poll() is None:
            if not threading.main_thread().is_alive():  # the flow's process is shutting down
                _kill(process)
            time.sleep(0.2)
    finally:
        if process.poll() is None:  # the parent is being interrupted: the ranks go with it
            _kill(process)
            process.wait()
        _live.discard(process)
        for reader in readers:
            reader.join(timeout=5)
    result = launch_dir / RESULT_FILE
    if process.returncode == 0 and result.is_file():
        return json.loads(result.read_text())
    killed = _killed_rank(list(stderr_tail))
    if killed:  # the other ranks' errors ("connection closed by peer") only follow from it
        rank, name = killed
        cause = " (out of memory, or killed by hand)" if name == "SIGKILL" else ""
        raise StageFailed(f"stage {stage_name} failed: its rank {rank} of {processes} was killed by {name}{cause}")
    errors = _rank_errors(launch_dir)
    if errors:
        first = errors[0]
        message = first["error"].removeprefix(f"{stage_name} failed: ")
        raise StageFailed(f"stage {stage_name} failed on rank {first['rank']} of {processes}: {message}")
    raise StageFailed(
        f"stage {stage_name} failed: its {processes} processes ended with status {process.returncode} and no rank "
        "reported an error (a rank was killed: out of memory, or by hand)"
    )


def _kill(process: subprocess.Popen) -> None:
    """Kill the launcher and every rank (they share its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    """Kill every launcher this process started, with its ranks."""
    for process in list(_live):
        if process.poll() is None:
            _kill(process)
