"""Run one stage in a process of its own, so a stage that dies takes nothing else with it.

The flow runs each stage's task in a thread and the stage's ML here, in a child process:
torch's RNG, thread pool and transformers' model loading are process-global, and a
process is what the kernel's out-of-memory killer ends. If the child dies (killed,
out of memory, a crash in native code), only that stage fails, with a message that
names it and the signal, and stages beside it carry on; if it raises, its exception
comes back with its message. Memory goes back to the system when each stage ends.

Children are forked from a ``multiprocessing`` fork server that has imported torch,
transformers, TRL and the stages once, so starting a stage costs milliseconds instead
of the seconds those imports take; the server starts clean (it is spawned, not forked
from the flow), so nothing of the parent's state leaks in. The child sends its
``pipeline_lib`` log records back over a queue; the parent re-emits them in its own
logging (and from there to the Prefect UI), so progress reaches the person watching.

No Prefect here: ``tasks/stages.py`` calls ``run_stage_process`` inside its task.

As with any ``multiprocessing`` start method other than fork, a script that runs the flow
must do so under ``if __name__ == "__main__":`` (``flows/rlhf.py`` does): the fork server
imports the main module once.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_lib import progress
from pipeline_lib.cores import process_alive
from pipeline_lib.errors import PipelineError, StageFailed

# Imported once in the fork server, so every stage process starts with them loaded: the
# main script first (otherwise multiprocessing re-runs it in every child), the libraries
# and the parts of them the trainers load lazily, then every stage module (found, not
# listed). This list is a start-up speed hint only: a module missing from it is imported
# by the stage that needs it (a second or two), and a name that fails to import is skipped.
PRELOAD_LIBRARIES = [
    "__main__",
    "torch",
    "transformers",
    "transformers.trainer",
    "transformers.models.llama.modeling_llama",
    "datasets",
    "trl",
    "trl.trainer.sft_trainer",
    "trl.trainer.reward_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.grpo_trainer",
    "trl.experimental.ppo",
]
# glibc's malloc serves every block over its mmap threshold (128 KiB, adapting up to 32 MiB)
# with a fresh mmap and unmaps it on free, so each large tensor a CPU stage allocates costs a
# page fault per 4 KiB it touches. Sampling allocates several per decoded token (the next
# token's logits for 320 sequences alone are 63 MB): while DPO sampled, a quarter of its CPU
# time went to the kernel. With mmap off (large blocks come from the heap and go back to it)
# sampling 32 prompts x 10 took 24.4 -> 17.2 s on 2 threads (64 x 10 on one, with a 4 GiB
# trim threshold: 80 -> 67 s), the same tokens to the bit. Only without a CUDA GPU: there
# the tensors live on the device, and a host heap that keeps freed blocks would hold on to a
# large model's loading buffers. The heap's top is still given back past 1 GiB free. A
# user's own MALLOC_* or GLIBC_TUNABLES settings are left as they are. glibc reads them when
# a process starts, so they are in the environment the fork server starts with, and only
# there: the flow's own environment stays as the user gave it.
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
_context: multiprocessing.context.ForkServerContext | None = None
_live: set = set()  # stage processes running now, for stop_all_stages


def cpu_malloc_env(environ: dict[str, str] | os._Environ, cuda: bool) -> dict[str, str]:
    """The malloc settings a CPU run's stage processes start with (``CPU_MALLOC_ENV``), or
    none on a CUDA machine or where the user tunes malloc already."""
    if cuda or "GLIBC_TUNABLES" in environ or any(name.startswith("MALLOC_") for name in environ):
        return {}
    return dict(CPU_MALLOC_ENV)


def _fork_server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        import pkgutil

        import pipeline_lib.stages as stage_package

        stage_modules = [f"{stage_package.__name__}.{info.name}" for info in pkgutil.iter_modules(stage_package.__path__)]
        # PPO lives in trl.experimental (see stages/ppo.py); its import warning says nothing new.
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import multiprocessing.forkserver
        from unittest import mock

        import torch

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([*PRELOAD_LIBRARIES, "pipeline_lib.registry", *stage_modules, __name__])
        # The standard library's scoped environment: set for the spawn, then as it was.
        with mock.patch.dict(os.environ, cpu_malloc_env(os.environ, torch.cuda.is_available())):
            multiprocessing.forkserver.ensure_running()  # spawned now, with those settings
    return _context


def end_with(flow_pid: int, every_seconds: float = 1.0) -> None:
    """End this stage process once the flow's process is gone (killed, or cancelled from the
    UI), so a run that stopped leaves no stage training on its own. A watchdog thread, not
    PR_SET_PDEATHSIG: this process's parent is the fork server, which outlives the flow
    for as long as any process it forked is alive."""

    def watch() -> None:
        while process_alive(flow_pid):
            time.sleep(every_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-flow", daemon=True).start()


def _child(
    stage_name: str,
    config_json: dict[str, Any],
    inputs: dict[str, str],
    out_dir: str,
    running_dir: str | None,
    threads: int | None,
    devices: str | None,
    flow_pid: int,
    logs,
    results,
) -> None:
    end_with(flow_pid)
    # The GPUs of the caller now (Ray sets them per task), not those the fork server was
    # started with: a reused Ray worker's earlier task may have had others. CUDA reads this
    # when it initialises, which the fork server never does.
    if devices is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    handler = logging.handlers.QueueHandler(logs)
    project_logger = logging.getLogger("pipeline_lib")
    project_logger.handlers[:] = [handler]
    project_logger.setLevel(logging.INFO)
    project_logger.propagate = False
    try:
        from pipeline_lib import cores, registry
        from pipeline_lib.config import PipelineConfig

        config = PipelineConfig.model_validate(config_json)
        stage = registry.stage(stage_name)
        # The plan's threads for the stage, or the CPUs a scheduler (Ray) granted it.
        with registered(running_dir, stage_name), cores.granted(threads) as used:
            project_logger.info("%s: stage process %d started (%d torch threads)", stage_name, os.getpid(), used)
            metrics = stage.run(config, {name: Path(path) for name, path in inputs.items()}, Path(out_dir))
        results.put({"metrics": metrics})
    except BaseException as error:  # everything goes back to the parent, which raises it
        message = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
        project_logger.error("%s failed:\n%s", stage_name, traceback.format_exc())
        results.put({"error": message})
        raise SystemExit(1)


@contextmanager
def registered(running_dir: str | Path | None, name: str) -> Iterator[None]:
    """While the block runs, ``<running_dir>/<name>.<pid>`` says which process trains which
    stage (or rank): ``ls <output_root>/prefect/running`` shows what is training now, and
    what to signal or profile. A killed process leaves its file behind; its pid is gone."""
    if running_dir is None:
        yield
        return
    marker = Path(running_dir) / f"{name}.{os.getpid()}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def _describe_exit(stage_name: str, pid: int, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        cause = " (out of memory, or killed by hand)" if name == "SIGKILL" else ""
        return f"stage {stage_name} failed: its process {pid} was killed by {name}{cause}"
    return f"stage {stage_name} failed: its process {pid} exited with status {exitcode} without a result"


def run_stage_process(
    stage_name: str,
    config_json: dict[str, Any],
    inputs: dict[str, Path],
    out_dir: Path,
    running_dir: Path | None = None,
    threads: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``registry.stage(stage_name).run`` in a child process; return its metrics.
    ``on_progress`` gets the progress of each record that carries one (pipeline_lib/progress.py).

    The stage's torch threads: ``threads`` (the plan's, pipeline_lib/cores.py, or the CPUs
    Ray granted); torch's default when None. While it trains, ``running_dir`` holds
    ``<stage>.<pid>`` (``registered``).

    Raises ``StageFailed`` naming the stage with the child's own error message, or with the
    signal that ended it."""
    context = _fork_server()
    logs, results = context.Queue(), context.Queue()
    process = context.Process(
        target=_child,
        args=(
            stage_name, config_json, {name: str(path) for name, path in inputs.items()}, str(out_dir),
            None if running_dir is None else str(running_dir), threads, os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.getpid(), logs, results,
        ),
        name=f"stage-{stage_name}",
    )
    process.start()
    _live.add(process)
    outcome: dict[str, Any] | None = None
    try:
        while outcome is None:
            _forward_logs(logs, on_progress)
            if not threading.main_thread().is_alive():
                # The flow's process is shutting down (SIGTERM, as a cancel from the UI sends):
                # the stage stops with it instead of training on unobserved.
                process.kill()
            try:
                outcome = results.get(timeout=0.2)
            except queue_module.Empty:
                if not process.is_alive():
                    try:  # the result may have arrived just as the process ended
                        outcome = results.get(timeout=1.0)
                    except queue_module.Empty:
                        break
        process.join()
    finally:
        if process.is_alive():  # the parent is being interrupted: the stage goes with it
            process.kill()
            process.join()
        _live.discard(process)
        _forward_logs(logs, on_progress)
    if outcome is None:
        raise StageFailed(_describe_exit(stage_name, process.pid, process.exitcode))
    if "error" in outcome:
        # Training errors already read "<stage> failed: ..."; say it once.
        raise StageFailed(f"stage {stage_name} failed: {outcome['error'].removeprefix(f'{stage_name} failed: ')}")
    return outcome["metrics"]


def stop_all_stages() -> None:
    """Kill every stage process this process started (a run being cancelled or terminated),
    the ranks of a stage on several processes included."""
    from pipeline_lib import distributed

    for process in list(_live):
        if process.is_alive():
            process.kill()
    distributed.stop_all()


@contextmanager
def stages_stop_on_sigterm() -> Iterator[None]:
    """While in this block, SIGTERM (what a cancel from the Prefect UI sends the flow's
    process) first kills the running stage processes, then does what it did before: the
    flow's own handler waits for its running tasks, and they end at once instead of when
    their stage would have finished. Only the main thread can install a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame) -> None:
        stop_all_stages()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forward_logs(logs, on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    while True:
        try:
            record = logs.get_nowait()
        except queue_module.Empty:
            return
        logging.getLogger(record.name).handle(record)
        progress.forward(record, on_progress)
