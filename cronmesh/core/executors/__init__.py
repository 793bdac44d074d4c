"""Executors: the ways cronmesh runs a job (``shell`` and ``http``).

Use ``get_executor(name)`` to obtain one, ``validate`` a job's
``executor_config`` when the job is saved, and ``await run(...)`` on the node
that executes it. See ``base`` for the shared contract.
"""

from __future__ import annotations

from cronmesh.core.executors.base import (
    MAX_OUTPUT_BYTES,
    ExecResult,
    Executor,
    OutputBuffer,
    OutputSink,
    get_executor,
    unknown_config_keys,
)
from cronmesh.core.executors.http import HttpExecutor
from cronmesh.core.executors.shell import ShellExecutor

__all__ = [
    "MAX_OUTPUT_BYTES",
    "ExecResult",
    "Executor",
    "HttpExecutor",
    "OutputBuffer",
    "OutputSink",
    "ShellExecutor",
    "get_executor",
    "unknown_config_keys",
]
