"""Manual recovery of a cluster that lost its quorum for good.

Raft cannot change its configuration without a majority of the old one. When
that majority is gone for good, an operator stops the survivors and writes a
new configuration straight into each one's log (hashicorp/raft's peers.json
serves the same purpose). The entry goes after the last one held, with the
newest term seen, so it is the configuration in force when the server
starts; the survivors then elect a leader among themselves.

This breaks Raft's guarantees on purpose: entries that only the lost servers
held are gone, and running it while a majority is alive can split the
cluster. docs/operations.md says when and how to use it.
"""

from __future__ import annotations

from cronmesh.errors import ValidationError
from cronmesh.raft.types import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    encode_config_entry,
)
from cronmesh.storage.raftlog import LmdbRaftStorage

__all__ = ["force_configuration"]


def force_configuration(storage: LmdbRaftStorage, voters: set[str]) -> tuple[int, int]:
    """Append a CONFIG entry making `voters` the whole configuration.

    Returns:
        (index, term) of the entry written.

    Raises:
        ValidationError: no voters, or this server has no Raft state at all.
    """
    if not voters:
        raise ValidationError("recover: at least one voter is needed", "peers")
    log, stable = storage.log, storage.stable
    last = log.last_index()
    snapshot = stable.snapshot()
    if last >= log.first_index():
        last_term = log.term(last)
    elif snapshot is not None:
        last_term = snapshot.meta.term
    else:
        raise ValidationError("recover: this data dir has no Raft state", "data_dir")
    hard = stable.hard_state()
    term = max(last_term, hard.term)
    data = encode_config_entry(Membership(frozenset(voters)), None)
    entry = Entry(last + 1, term, EntryKind.CONFIG, data)
    log.append([entry])
    stable.save_hard_state(HardState(term=term, vote=None, commit=hard.commit))
    return entry.index, term
