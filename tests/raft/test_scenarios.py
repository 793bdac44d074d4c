"""Named Raft scenarios, each run on the simulator's Cluster.

The Cluster's Checker verifies the safety properties on every Ready, so each
scenario also fails on a safety break, not only on its own assertions.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from cronmesh.errors import InvariantViolation
from cronmesh.raft.errors import TransferInProgress
from cronmesh.raft.messages import AppendEntries, Message, RequestVote, TimeoutNow
from cronmesh.raft.node import RaftConfig, RaftNode
from cronmesh.raft.ready import Role
from cronmesh.raft.sim import Cluster, NetConfig
from cronmesh.raft.storage import (
    MemoryLogStore,
    MemoryStableStore,
    bootstrap,
    persist_ready,
)
from cronmesh.raft.types import ConfChange, ConfChangeOp, Entry, EntryKind

ELECTION = 10  # RaftConfig default election_ticks


def ids(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def cluster(n: int = 3, seed: int = 1, **kwargs: object) -> Cluster:
    return Cluster(ids(n), seed=seed, **kwargs)  # type: ignore[arg-type]


def commit_all(c: Cluster, payload: str, members: list[str] | None = None) -> None:
    """Propose at the leader and wait until every member applied it."""
    leader = c.wait_leader()
    c.propose(leader, payload)
    targets = members or sorted(c.core(leader).membership.members)
    ok = c.run_until(lambda: c.applied_everywhere(payload, targets), 20 * ELECTION)
    assert ok, f"{payload} not applied on {targets}"


def leaders(c: Cluster) -> list[str]:
    return [n.id for n in c.live() if n.core is not None and n.core.role is Role.LEADER]


# -- elections ---------------------------------------------------------------


def test_initial_election() -> None:
    c = cluster(3)
    leader = c.wait_leader(5 * ELECTION)
    c.run(2 * ELECTION)
    assert leaders(c) == [leader]
    terms = {c.core(i).term for i in c.nodes}
    assert len(terms) == 1
    assert all(c.core(i).leader == leader for i in c.nodes)


def test_reelection_after_leader_loss() -> None:
    c = cluster(3)
    old = c.wait_leader()
    old_term = c.core(old).term
    c.isolate(old)
    c.run(4 * ELECTION)
    new = c.leader()
    assert new is not None and new != old
    assert c.core(new).term > old_term
    c.heal()
    c.run(2 * ELECTION)
    assert c.core(old).role is Role.FOLLOWER
    assert c.core(old).leader == c.leader()


def test_no_leader_without_majority() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    followers = [i for i in c.nodes if i != leader]
    for f in followers:
        c.isolate(f)
    c.run(6 * ELECTION)
    assert leaders(c) == []  # the old leader stepped down (check-quorum)
    c.heal()
    assert c.wait_leader(10 * ELECTION)


def test_many_elections_under_churn() -> None:
    c = cluster(5, seed=7)
    rng = random.Random(7)
    for _ in range(12):
        c.heal()
        for victim in rng.sample(sorted(c.nodes), 2):
            c.isolate(victim)
        c.run(3 * ELECTION)
        # A majority (3 of 5) is connected, so there is a leader among them.
        c.wait_leader(10 * ELECTION)
    c.heal()
    commit_all(c, "after-churn")
    assert len(c.checker.leaders) > 3


# -- agreement -----------------------------------------------------------------


def test_basic_agreement() -> None:
    c = cluster(3)
    for i in range(5):
        commit_all(c, f"cmd{i}")
    histories = {c.nodes[i].sm.digest for i in c.nodes}
    assert len(histories) == 1


def test_agreement_despite_disconnected_follower() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    lagging = next(i for i in c.nodes if i != leader)
    c.isolate(lagging)
    others = [i for i in c.nodes if i != lagging]
    for i in range(4):
        commit_all(c, f"x{i}", others)
    assert not c.applied_everywhere("x0", [lagging])
    c.heal()
    assert c.run_until(lambda: c.applied_everywhere("x3", list(c.nodes)), 200)


def test_no_agreement_without_majority() -> None:
    c = cluster(5)
    leader = c.wait_leader()
    commit_all(c, "before")
    followers = [i for i in c.nodes if i != leader]
    for f in followers[:3]:
        c.isolate(f)
    index, _ = c.propose(leader, "lost?")
    c.run(3 * ELECTION)
    assert all(c.core(i).commit < index for i in c.nodes)
    assert not any("lost?" in c.nodes[i].sm.items for i in c.nodes)
    c.heal()
    commit_all(c, "after")


def test_concurrent_proposals() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    core = c.core(leader)
    # Many proposals before one ready(): one batch, one AppendEntries per peer.
    proposed = [core.propose(f"c{i}".encode()) for i in range(20)]
    for i, key in enumerate(proposed):
        c.nodes[leader].pending[key] = f"c{i}"
    c.process(c.nodes[leader])
    assert [p[0] for p in proposed] == list(range(proposed[0][0], proposed[0][0] + 20))
    assert c.run_until(lambda: c.applied_everywhere("c19", list(c.nodes)), 100)
    assert len(c.checker.acked) == 20


def test_rejoining_old_leader() -> None:
    c = cluster(3)
    old = c.wait_leader()
    commit_all(c, "a")
    c.isolate(old)
    for i in range(3):
        c.propose(old, f"stale{i}")  # never committed
    c.run(4 * ELECTION)
    new = c.wait_leader()
    assert new != old
    commit_all(c, "b", [i for i in c.nodes if i != old])
    c.heal()
    commit_all(c, "c")
    assert not any(
        f"stale{i}" in c.nodes[n].sm.items for i in range(3) for n in c.nodes
    )
    c.check_logs()


def test_follower_far_behind_catches_up_backup() -> None:
    """6.824's TestBackup: long divergent logs are reconciled quickly."""
    c = cluster(5, seed=3)
    leader = c.wait_leader()
    commit_all(c, "base")
    allies = [leader, next(i for i in c.nodes if i != leader)]
    others = [i for i in c.nodes if i not in allies]
    c.partition(allies, others)
    for i in range(50):
        c.propose(leader, f"dead{i}")  # uncommitted in the minority
    assert c.run_until(lambda: c.leader() in others, 5 * ELECTION)
    new = c.leader()
    assert new is not None
    for i in range(50):
        c.propose(new, f"live{i}")
    assert c.run_until(lambda: c.applied_everywhere("live49", others), 300)
    c.heal()
    sent_before = c.stats["AppendEntries"]
    assert c.run_until(lambda: c.applied_everywhere("live49", list(c.nodes)), 300)
    assert c.stats["AppendEntries"] - sent_before < 400
    assert not any(
        f"dead{i}" in c.nodes[n].sm.items for i in range(50) for n in c.nodes
    )


def test_persisted_term_and_vote_across_restarts() -> None:
    log, stable = MemoryLogStore(), MemoryStableStore()
    bootstrap(log, stable, {"a", "b", "c"})
    config = RaftConfig(node_id="a")
    core = RaftNode(config, log, stable, random.Random(1))
    core.step(RequestVote(to="a", frm="b", term=5, last_index=1, last_term=1))
    ready = core.ready()
    assert ready.hard_state is not None and ready.hard_state.vote == "b"
    assert ready.messages[0].granted  # type: ignore[attr-defined]
    persist_ready(ready, log, stable)
    core.advance(ready)
    # Crash and restart from the stores only.
    again = RaftNode(config, log, stable, random.Random(2))
    assert (again.term, again.vote) == (5, "b")
    again.step(RequestVote(to="a", frm="c", term=5, last_index=1, last_term=1))
    assert not again.ready().messages[0].granted  # type: ignore[attr-defined]


def test_restart_of_whole_cluster_keeps_committed_entries() -> None:
    c = cluster(3)
    for i in range(3):
        commit_all(c, f"p{i}")
    for i in c.nodes:
        c.crash(i)
    for i in c.nodes:
        c.restart(i)
    commit_all(c, "after-restart")
    assert c.applied_everywhere("p0", list(c.nodes))


def _figure8(net: NetConfig, seed: int) -> None:
    """Figure 8 of the Raft paper as 6.824 tests it: leaders crash at random."""
    c = Cluster(ids(5), seed=seed, net=net)
    rng = random.Random(seed)
    up = set(c.nodes)
    for round_ in range(60):
        for node in c.live():  # every server that believes it leads
            if node.core is not None and node.core.role is Role.LEADER:
                c.propose(node.id, f"f{round_}-{node.id}")
        c.run(rng.choice((1, 3, 13)))
        leader = c.leader()
        if leader is not None and rng.random() < 0.5:
            c.crash(leader)
            up.discard(leader)
        if len(up) < 3:
            node = rng.choice(sorted(set(c.nodes) - up))
            c.restart(node)
            up.add(node)
    for node in c.nodes:
        c.restart(node)
    c.heal()
    c.net = NetConfig()
    commit_all(c, "final")
    for payload in c.checker.acked:
        assert c.applied_everywhere(payload, list(c.nodes))


def campaign(c: Cluster, node_id: str) -> None:
    """Make ``node_id`` start an election now (as a leadership transfer would)."""
    c.act(
        node_id,
        lambda core: core.step(TimeoutNow(to=node_id, frm=node_id, term=core.term)),
    )
    c.deliver()


def strip_entries_of_term(sender: str, term: int) -> Callable[[Message], Message]:
    """Deliver ``sender``'s AppendEntries without its entries of ``term``."""

    def intercept(msg: Message) -> Message:
        if isinstance(msg, AppendEntries) and msg.frm == sender:
            kept = tuple(e for e in msg.entries if e.term != term)
            return dataclasses.replace(msg, entries=kept)
        return msg

    return intercept


def test_figure8_paper_sequence() -> None:
    """Figure 8 step by step: an old-term entry on a majority is not committed."""
    one_entry = lambda i: RaftConfig(node_id=i, max_msg_entries=1)  # noqa: E731
    c = Cluster(ids(5), seed=1, make_config=one_entry)
    campaign(c, "n1")
    commit_all(c, "base")
    # (a) n1 leads in term t and replicates X at index i to n2 only.
    c.partition(["n1", "n2"], ["n3", "n4", "n5"])
    i, t = c.propose("n1", "X")
    c.deliver()
    assert c.core("n2").log.term(i) == t
    # (b) n1 crashes; n5 is elected in t+1 by n3, n4 and appends its no-op at
    # i, which reaches nobody.
    c.crash("n1")
    c.heal()
    c.intercept = lambda m: (
        None if m.frm == "n5" and isinstance(m, AppendEntries) else m
    )
    campaign(c, "n5")
    assert c.core("n5").role is Role.LEADER and c.core("n5").log.term(i) == t + 1
    # (c) n5 crashes; n1 comes back, is elected in t+2, and X reaches n3
    # (a majority: n1, n2, n3) while its own no-op does not.
    c.crash("n5")
    c.restart("n1")
    c.intercept = strip_entries_of_term("n1", t + 2)
    campaign(c, "n1")
    if c.core("n1").role is not Role.LEADER:
        campaign(c, "n1")  # n3, n4 voted for n5 in t+1: try again in t+2
    assert c.core("n1").role is Role.LEADER and c.core("n1").term == t + 2
    for _ in range(6):  # heartbeats let n1 find where n3's log ends
        c.act("n1", lambda core: core.tick())
        c.deliver()
    assert c.core("n3").log.term(i) == t
    # X is on a majority but from an older term: it must not commit (§3.6.2).
    assert c.core("n1").commit < i
    # (d) n1 crashes; n5 can win (its last term t+1 beats X's t) and
    # overwrites X.  The checker would flag it had X been committed.
    c.crash("n1")
    c.intercept = None
    c.restart("n5")
    campaign(c, "n5")
    if c.core("n5").role is not Role.LEADER:
        campaign(c, "n5")
    assert c.core("n5").role is Role.LEADER
    c.restart("n1")
    commit_all(c, "after")
    assert not any("X" in c.nodes[n].sm.items for n in c.nodes)


def test_figure8_reliable() -> None:
    _figure8(NetConfig(), seed=8)


def test_figure8_unreliable() -> None:
    _figure8(NetConfig(loss=0.1, duplicate=0.05, max_delay=4, codec=0.2), seed=9)


# -- snapshots and membership -----------------------------------------------------


def small_chunks(node_id: str) -> RaftConfig:
    return RaftConfig(node_id=node_id, snapshot_chunk_bytes=64, max_msg_entries=8)


def test_snapshot_install_to_lagging_follower() -> None:
    c = Cluster(ids(3), seed=2, make_config=small_chunks)
    leader = c.wait_leader()
    lagging = next(i for i in c.nodes if i != leader)
    c.isolate(lagging)
    others = [i for i in c.nodes if i != lagging]
    for i in range(30):
        commit_all(c, f"s{i}", others)
    for node in others:
        c.compact(node)
    assert c.core(leader).log.snap_index > c.core(lagging).log.last_index()
    c.heal()
    assert c.run_until(lambda: c.applied_everywhere("s29", list(c.nodes)), 200)
    assert c.stats["snapshot_installed"] == 1
    assert c.stats["InstallSnapshot"] > 3  # sent in several chunks
    commit_all(c, "after-snapshot")
    snap = c.nodes[lagging].stable.snapshot()
    assert snap is not None and c.nodes[lagging].log_store.first_index() > 1


def test_membership_change_while_node_partitioned() -> None:
    c = Cluster(ids(4), seed=4, voters=ids(3))
    leader = c.wait_leader()
    commit_all(c, "start", ids(3))
    cut = next(i for i in ids(3) if i != leader)
    c.isolate(cut)
    rest = [i for i in ids(3) if i != cut]

    def change(op: ConfChangeOp, node: str) -> None:
        leader = c.wait_leader()
        c.act(leader, lambda core: core.propose_conf_change(ConfChange(op, node)))
        c.run_until(
            lambda: c.core(leader).commit >= c.core(leader).log.last_index(), 50
        )

    change(ConfChangeOp.ADD_LEARNER, "n4")
    commit_all(c, "learner-sees-this", [*rest, "n4"])
    change(ConfChangeOp.PROMOTE, "n4")
    change(ConfChangeOp.REMOVE, cut)
    leader = c.wait_leader()
    membership = c.core(leader).membership
    assert membership.voters == {*rest, "n4"} and not membership.learners
    term = c.core(leader).term
    c.heal()
    c.run(5 * ELECTION)
    # The removed server neither disrupts the cluster nor gets the new entries.
    assert c.leader() == leader and c.core(leader).term == term
    commit_all(c, "done", [*rest, "n4"])


def test_learner_never_votes_nor_campaigns() -> None:
    c = Cluster(ids(3), seed=5, voters=["n1", "n2"])
    leader = c.wait_leader()
    c.act(
        leader,
        lambda core: core.propose_conf_change(
            ConfChange(ConfChangeOp.ADD_LEARNER, "n3")
        ),
    )
    commit_all(c, "x", ids(3))
    c.isolate("n3")
    c.run(10 * ELECTION)
    assert c.core("n3").role is Role.FOLLOWER
    assert c.stats["RequestVote"] == 0 or c.core("n3").term == c.core(leader).term


# -- leadership transfer, check-quorum, pre-vote, reads -------------------------


def test_leadership_transfer_with_writes_in_flight() -> None:
    c = cluster(3)
    old = c.wait_leader()
    commit_all(c, "w-before")
    for i in range(5):
        c.propose(old, f"inflight{i}")
    target = next(i for i in c.nodes if i != old)
    c.act(old, lambda core: core.transfer_leadership(target))
    with pytest.raises(TransferInProgress):
        c.propose(old, "refused")
    assert c.run_until(lambda: c.leader() == target, 3 * ELECTION)
    commit_all(c, "w-after")
    for payload in c.checker.acked:
        assert c.applied_everywhere(payload, list(c.nodes))
    assert c.applied_everywhere("inflight4", list(c.nodes))


def test_leadership_transfer_aborts_when_target_unreachable() -> None:
    c = cluster(3)
    old = c.wait_leader()
    target = next(i for i in c.nodes if i != old)
    c.isolate(target)
    c.act(old, lambda core: core.transfer_leadership(target))
    c.run(ELECTION + 2)
    assert c.leader() == old
    c.propose(old, "accepted-again")


def test_check_quorum_step_down() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    term = c.core(leader).term
    c.isolate(leader)
    c.run(2 * ELECTION + 1)
    assert c.core(leader).role is Role.FOLLOWER
    assert c.core(leader).term == term  # stepped down, no election of its own


def test_pre_vote_prevents_term_inflation() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    commit_all(c, "x")
    term = c.core(leader).term
    loner = next(i for i in c.nodes if i != leader)
    c.isolate(loner)
    c.run(30 * ELECTION)
    assert c.core(loner).term == term  # pre-votes failed; term never bumped
    c.heal()
    c.run(3 * ELECTION)
    assert c.leader() == leader and c.core(leader).term == term


def test_without_pre_vote_terms_inflate() -> None:
    c = Cluster(
        ids(3), seed=1, make_config=lambda i: RaftConfig(node_id=i, pre_vote=False)
    )
    leader = c.wait_leader()
    loner = next(i for i in c.nodes if i != leader)
    c.isolate(loner)
    c.run(10 * ELECTION)
    assert c.core(loner).term > c.core(leader).term


def test_read_index_on_leader_and_follower() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    commit_all(c, "v1")
    follower = next(i for i in c.nodes if i != leader)
    served = c.served_reads
    c.read(leader, b"r-leader")
    c.read(follower, b"r-follower")
    c.run(5)
    assert {(n, ctx) for n, ctx, _ in served} == {
        (leader, b"r-leader"),
        (follower, b"r-follower"),
    }
    need = c.checker.acked["v1"]
    assert all(index >= need for _, _, index in served)


def test_read_index_fails_without_quorum() -> None:
    c = cluster(3)
    leader = c.wait_leader()
    commit_all(c, "v1")
    for i in c.nodes:
        if i != leader:
            c.isolate(i)
    c.read(leader, b"stuck")
    c.run(3 * ELECTION)  # check-quorum steps the leader down: the read fails
    assert c.stats["read_failed"] == 1 and c.stats["read_served"] == 0


def test_leader_lease_ignores_removed_server() -> None:
    """§4.2.3: a removed server's vote requests do not unseat a live leader.

    Pre-vote is off, so only check-quorum's lease protects the cluster.
    """
    c = Cluster(
        ids(3), seed=3, make_config=lambda i: RaftConfig(node_id=i, pre_vote=False)
    )
    leader = c.wait_leader()
    commit_all(c, "x")
    removed = next(i for i in c.nodes if i != leader)
    c.isolate(removed)
    c.act(
        leader,
        lambda core: core.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, removed)),
    )
    stay = [i for i in c.nodes if i != removed]
    commit_all(c, "after-remove", stay)
    c.run(5 * ELECTION)  # the removed server keeps campaigning, terms rising
    assert c.core(removed).term > c.core(leader).term
    term = c.core(leader).term
    c.heal()
    c.run(10 * ELECTION)
    assert c.leader() == leader and c.core(leader).term == term


# -- messages from another cluster --------------------------------------------


def test_messages_from_another_cluster_are_dropped_not_fatal() -> None:
    c = cluster(3, seed=7)
    commit_all(c, "a-1")
    leader = c.wait_leader()
    follower = next(i for i in c.nodes if i != leader)
    term = c.core(leader).term
    commit = c.core(leader).commit
    # x1 leads another cluster in the same term; its log contradicts ours.
    foreign = tuple(
        Entry(i, term + 5, EntryKind.NORMAL, b"other") for i in range(1, commit + 2)
    )
    for target in (leader, follower):
        c.core(target).step(
            AppendEntries(
                to=target,
                frm="x1",
                term=term,
                prev_index=0,
                prev_term=0,
                entries=foreign,
                commit=commit + 1,
            )
        )
        c.process(c.nodes[target])
    assert c.core(leader).dropped_unknown == 1
    assert c.core(follower).dropped_unknown == 1
    assert c.core(follower).leader == leader, "a stranger became the leader"
    assert leaders(c) == [leader]
    commit_all(c, "a-2")
    c.check_logs()


def test_a_second_leader_inside_the_configuration_is_still_a_bug() -> None:
    c = cluster(3, seed=7)
    leader = c.wait_leader()
    member = next(i for i in c.nodes if i != leader)
    heartbeat = AppendEntries(
        to=leader, frm=member, term=c.core(leader).term, prev_index=0, prev_term=0
    )
    with pytest.raises(InvariantViolation, match="two leaders"):
        c.core(leader).step(heartbeat)
