"""The project's exceptions: each names what is wrong, and each survives pickling.

Stages run in worker processes (Prefect's process pool, Ray workers, ``accelerate``
ranks), so an exception raised there is pickled back to the flow. Python pickles an
exception as ``type(error)(*error.args)``, which breaks for any subclass whose
``__init__`` takes other arguments than its message (``DataValidationError(source,
problems)`` came back as a ``TypeError`` about a missing argument, hiding the real
message). ``PipelineError.__reduce__`` rebuilds the instance from its message and its
attributes instead, whatever the subclass's constructor takes.
"""

from __future__ import annotations


def _rebuild(cls: type, args: tuple) -> Exception:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    return error


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""

    def __reduce__(self):
        return (_rebuild, (type(self), self.args), dict(self.__dict__))


class ConfigError(PipelineError, ValueError):
    """A configuration value is invalid; the message names the field."""


class StageFailed(PipelineError, RuntimeError):
    """A stage raised; the message names the stage and the cause."""


class StoreError(PipelineError, RuntimeError):
    """A stage output in the store is missing or does not match its manifest."""


class ModelError(PipelineError, RuntimeError):
    """A base model cannot be found, converted or loaded."""
