"""Serve the ``rlhf`` flow as the deployment ``rlhf/retrain``: runs from the UI and scheduled retraining.

    prefect server start --host 127.0.0.1 --port 4200                    # terminal 1
    export PREFECT_API_URL=http://127.0.0.1:4200/api                      # terminal 2, repository root
    python deployments/serve.py                                            # default preset, daily at 03:00 UTC
    python deployments/serve.py --cron "0 */6 * * *" --preset tiny --set data.source=/data/pairs.jsonl
    prefect deployment run rlhf/retrain                                    # terminal 3: one run now

The process registers the deployment (schedule, saved parameters, tags, at most one run
at a time; further runs wait in the queue) and executes each of its flow runs in a
subprocess until stopped; Ctrl-C pauses the schedule. The saved parameters take every
option of ``python flows/rlhf.py`` (``--preset``, ``--config``, ``--set``, ``--stages``,
``--force``, ``--output-root``): scheduled runs and the UI's Quick run use them, Custom run
shows them as a form.

Scheduled retraining only does what changed: every run computes its plan afresh, and the
plan fingerprints the data sources (a local file's content, a hub dataset's current
revision; ``pipeline_lib.plan.data_fingerprint``). Unchanged data: every stage is Cached
and the run takes seconds. New data: data prep and everything downstream train again. A
failed run retried from the UI (or ``prefect flow-run retry``) skips the stages that
finished and starts at the one that failed.

The schedule comes from ``--cron`` / ``--timezone``, else ``RLHF_RETRAIN_CRON`` /
``RLHF_RETRAIN_TIMEZONE`` (environment, then ``.env``), else daily at 03:00 UTC.
``deployments/prefect.yaml`` declares the same deployment for a process work pool and
workers on other machines. Run this from the repository root: the deployment's entrypoint
(``flows/rlhf.py:rlhf``), ``prefect.toml`` and ``.env`` are found relative to it.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import get_current_settings
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.rlhf import RunParameters, build_parser as build_run_parser, parameters_from_args, rlhf
from pipeline_lib.config import ConfigError

DEPLOYMENT_NAME = "retrain"
TAGS = ["rlhf", "retrain"]
# One run at a time: two trainings of the same stage would only wait on each other's lock,
# and retraining that overlaps itself means the schedule is too tight.
CONCURRENCY_LIMIT = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


class RetrainSchedule(BaseSettings):
    """When scheduled retraining runs: options, else ``RLHF_RETRAIN_*`` (environment, then ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="RLHF_RETRAIN_", env_file=".env", extra="ignore")

    cron: str = Field("0 3 * * *", description="Cron expression of scheduled retraining (default: daily at 03:00).")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")

    @model_validator(mode="after")
    def _valid_cron(self) -> "RetrainSchedule":
        self.schedule()  # croniter and zoneinfo reject a bad expression or zone here, not at 3 a.m.
        return self

    def schedule(self) -> CronSchedule:
        return CronSchedule(cron=self.cron, timezone=self.timezone)


def retrain_deployment(params: RunParameters, schedule: RetrainSchedule) -> RunnerDeployment:
    """The ``rlhf/retrain`` deployment with ``params`` as its saved parameters."""
    return rlhf.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[schedule.schedule()],
        parameters={"params": params.model_dump(mode="json")},
        tags=TAGS,
        concurrency_limit=CONCURRENCY_LIMIT,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python deployments/serve.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is one of `python flows/rlhf.py --help` and sets the saved parameters.",
    )
    parser.add_argument("--cron", help="cron expression of scheduled retraining (default: RLHF_RETRAIN_CRON or '0 3 * * *')")
    parser.add_argument("--timezone", help="time zone of the cron expression (default: RLHF_RETRAIN_TIMEZONE or UTC)")
    return parser


def parse(argv: list[str] | None) -> tuple[RunParameters, RetrainSchedule]:
    """Schedule and saved parameters from the command line, validated before anything registers."""
    args, run_options = build_parser().parse_known_args(argv)
    run_args = build_run_parser().parse_args(run_options)
    if run_args.dry_run:
        raise ConfigError("--dry-run belongs to `python flows/rlhf.py`; a deployment has no dry run")
    schedule = RetrainSchedule(**{name: value for name in ("cron", "timezone") if (value := getattr(args, name))})
    params = parameters_from_args(run_args)
    # Loading the config now turns a typo into an error here instead of in every scheduled run.
    params.config()
    return params, schedule


def main(argv: list[str] | None = None) -> int:
    try:
        params, schedule = parse(argv)
    except (ConfigError, ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not get_current_settings().api.url:
        # Without an API URL Prefect would start a temporary server, which refuses schedules.
        print(
            "error: PREFECT_API_URL is not set. Start a server (prefect server start --host 127.0.0.1) and\n"
            "       export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    serve(retrain_deployment(params, schedule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
