"""Errors raised by the Raft core, under one base class.

    CronmeshError
    └── RaftError                 anything the Raft core refuses or reports
        ├── NotLeader             this node cannot serve the request; try the hint
        ├── ProposalDropped       the proposal was refused and never entered the log
        ├── TransferInProgress    a leadership transfer is under way
        ├── ConfigChangeInProgress  an earlier membership change is not committed yet
        ├── InvalidRequest        the caller asked for something impossible (also a
        │                         ValidationError)
        ├── ReadyPending          an input arrived between ``ready()`` and ``advance()``
        └── DecodeError           bytes from a peer are not a valid message (also a
                                  RemoteError)

Broken internal rules raise ``cronmesh.errors.InvariantViolation``, never these.
"""

from __future__ import annotations

from cronmesh.errors import CronmeshError, RemoteError, ValidationError

__all__ = [
    "ConfigChangeInProgress",
    "DecodeError",
    "InvalidRequest",
    "NotLeader",
    "ProposalDropped",
    "RaftError",
    "ReadyPending",
    "TransferInProgress",
]


class RaftError(CronmeshError):
    """Base class of the errors the Raft core raises on purpose."""


class NotLeader(RaftError):
    """This node is not the leader; ``leader_hint`` names the one it knows, if any."""

    def __init__(self, leader_hint: str | None) -> None:
        super().__init__(f"raft: not the leader (leader hint: {leader_hint})")
        self.leader_hint = leader_hint


class ProposalDropped(RaftError):
    """The proposal was refused and did not enter the log."""


class TransferInProgress(ProposalDropped):
    """A leadership transfer is under way; proposals wait until it ends."""


class ConfigChangeInProgress(ProposalDropped):
    """A membership change may not start before the previous one is committed."""


class InvalidRequest(RaftError, ValidationError):
    """The caller asked for something that can never succeed (unknown peer, ...)."""


class ReadyPending(RaftError):
    """An input was given while a ``Ready`` was handed out and not yet advanced."""


class DecodeError(RaftError, RemoteError):
    """Bytes received from a peer do not decode to a valid message."""
