"""The SWIM core driven by hand: each transition, the batch contract and
robustness against hostile input."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cronmesh.errors import InvariantViolation, ValidationError
from cronmesh.gossip import (
    PROFILES,
    Batch,
    EventKind,
    GossipConfig,
    GossipCore,
    Keyring,
    MemberState,
    PingRequest,
    PushPullRequest,
    generate_key,
    profile,
)
from cronmesh.gossip.codec import decode_packet, encode_message, encode_packet
from cronmesh.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
)
from cronmesh.gossip.sim import Simulator, run_join_scenario

CFG = profile("lan")
PORT = 7946


def make(i: int, config: GossipConfig = CFG, **kwargs: object) -> GossipCore:
    return GossipCore(
        f"n{i}",
        f"10.0.0.{i}",
        PORT,
        config=config,
        rng=random.Random(i),
        **kwargs,  # type: ignore[arg-type]
    )


def push_pull(a: GossipCore, b: GossipCore, now: int = 0) -> tuple[Batch, Batch]:
    """``a`` joins through ``b``; returns (b's batch, a's batch)."""
    member = b.local_member
    request = a.join(now, [(member.host, member.port)]).tcp_requests[0]
    assert isinstance(request, PushPullRequest) and request.join
    served = b.receive_stream(now, request.payload)
    assert served.reply is not None
    return served, a.tcp_result(now, request.request_id, served.reply)


def packet(*msgs: Message) -> bytes:
    return encode_packet([encode_message(m) for m in msgs], None)


def sent(batch: Batch) -> list[tuple[str, Message]]:
    return [(p.host, m) for p in batch.packets for m in decode_packet(p.data, None)]


def test_join_by_push_pull_reports_join_on_both_sides() -> None:
    a, b = make(1), make(2)
    served, joined = push_pull(a, b)
    assert [(e.kind, e.member.name) for e in served.events] == [(EventKind.JOIN, "n1")]
    assert [(e.kind, e.member.name) for e in joined.events] == [(EventKind.JOIN, "n2")]
    assert {m.name for m in a.members()} == {"n1", "n2"}


def test_direct_probe_and_ack() -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    batch = a.tick(a.next_deadline_ms())
    while not any(isinstance(m, Ping) for _, m in sent(batch)):
        batch = a.tick(a.next_deadline_ms())
    host, ping = next((h, m) for h, m in sent(batch) if isinstance(m, Ping))
    assert host == "10.0.0.2" and ping.target == "n2"
    reply = b.receive_packet(a.next_deadline_ms() - 1, batch.packets[0].data)
    acks = [m for _, m in sent(reply) if isinstance(m, Ack)]
    assert acks == [Ack(ping.seq)]
    a.receive_packet(a.next_deadline_ms() - 1, reply.packets[0].data)
    assert a._probe is None
    assert a.state_of("n2") == MemberState.ALIVE


def _start_probe(a: GossipCore, target: str) -> tuple[int, Ping]:
    """Tick ``a`` until it probes ``target``; other probes are acked."""
    now = a.next_deadline_ms()
    while True:
        batch = a.tick(now)
        pings = [m for _, m in sent(batch) if isinstance(m, Ping)]
        if pings and pings[0].target == target:
            return now, pings[0]
        if pings:
            a.receive_packet(now, packet(Ack(pings[0].seq)))
        now = a.next_deadline_ms()


def test_missed_ack_goes_indirect_then_suspects() -> None:
    a, b, c, d = make(1), make(2), make(3), make(4)
    for other in (b, c, d):
        push_pull(a, other)
    start, ping = _start_probe(a, "n2")
    indirect = a.tick(start + CFG.probe_timeout_ms)
    reqs = [(h, m) for h, m in sent(indirect) if isinstance(m, IndirectPing)]
    assert {h for h, _ in reqs} == {"10.0.0.3", "10.0.0.4"}
    assert all(m.target == "n2" and m.nack and m.seq == ping.seq for _, m in reqs)
    [fallback] = indirect.tcp_requests
    assert isinstance(fallback, PingRequest)
    assert fallback.deadline_ms == start + CFG.probe_interval_ms
    # Both helpers answer with a nack: the failure is not held against us.
    a.receive_packet(start + 600, packet(Nack(ping.seq), Nack(ping.seq)))
    a.tcp_result(start + 700, fallback.request_id, None)
    end = a.tick(start + CFG.probe_interval_ms)
    assert a.state_of("n2") == MemberState.SUSPECT
    assert a.health_score == 0
    # The suspect is told directly (buddy system), so it can refute.
    assert ("10.0.0.2", Suspect(1, "n2", "n1")) in sent(end)


def test_missing_nacks_raise_local_health() -> None:
    a, b, c, d = make(1), make(2), make(3), make(4)
    for other in (b, c, d):
        push_pull(a, other)
    start, _ = _start_probe(a, "n2")
    a.tick(start + CFG.probe_timeout_ms)
    a.tick(start + CFG.probe_interval_ms)
    assert a.health_score == 2  # two helpers, no nacks
    assert a.next_deadline_ms() >= start + CFG.probe_interval_ms


def test_indirect_ack_or_tcp_fallback_saves_the_target() -> None:
    a, b, c = make(1), make(2), make(3)
    push_pull(a, b)
    push_pull(a, c)
    start, _ = _start_probe(a, "n2")
    batch = a.tick(start + CFG.probe_timeout_ms)
    [fallback] = batch.tcp_requests
    reply = b.receive_stream(start + 550, fallback.payload).reply
    a.tcp_result(start + 560, fallback.request_id, reply)
    a.tick(start + CFG.probe_interval_ms)
    assert a.state_of("n2") == MemberState.ALIVE


def _probe_at_health(health: int, target: str = "n2") -> tuple[GossipCore, int, Ping]:
    """Four members; n1 starts probing ``target`` with the given health
    score (probes of the others on the way are acked)."""
    a, b, c, d = make(1), make(2), make(3), make(4)
    for other in (b, c, d):
        push_pull(a, other)
    now = a.next_deadline_ms()
    while True:
        a._awareness.score = health
        pings = [m for _, m in sent(a.tick(now)) if isinstance(m, Ping)]
        if pings and pings[0].target == target:
            return a, now, pings[0]
        if pings:
            a.receive_packet(now, packet(Ack(pings[0].seq)))
        now = a.next_deadline_ms()


# (health score, direct-ack timeout, suspect at), ms after the ping. Like
# memberlist's probeNode: the ack timeout is never stretched, the whole
# probe period is, by health + 1.
PROBE_OF_A_DEAD_MEMBER = [(0, 500, 1_000), (1, 500, 2_000), (3, 500, 4_000)]


@pytest.mark.parametrize(("health", "ack_ms", "suspect_ms"), PROBE_OF_A_DEAD_MEMBER)
def test_probe_of_a_dead_member_is_declared_failed_at_the_period_end(
    health: int, ack_ms: int, suspect_ms: int
) -> None:
    a, start, ping = _probe_at_health(health)
    assert a.next_deadline_ms() == start + ack_ms
    indirect = a.tick(start + ack_ms)
    assert any(isinstance(m, IndirectPing) for _, m in sent(indirect))
    [fallback] = indirect.tcp_requests
    assert isinstance(fallback, PingRequest)
    assert fallback.deadline_ms == start + suspect_ms
    a.receive_packet(start + ack_ms + 50, packet(Nack(ping.seq), Nack(ping.seq)))
    a.tcp_result(start + ack_ms + 60, fallback.request_id, None)
    assert a.next_deadline_ms() == start + suspect_ms
    a.tick(start + suspect_ms - 1)
    assert a.state_of("n2") == MemberState.ALIVE
    end = a.tick(start + suspect_ms)
    assert a.state_of("n2") == MemberState.SUSPECT
    # The next probe goes out in the same tick, not a period later.
    assert any(isinstance(m, Ping) for _, m in sent(end))
    assert a.health_score == health  # both helpers nacked


def test_answered_probes_keep_the_plain_interval_when_unhealthy() -> None:
    a, start, ping = _probe_at_health(3)
    a.receive_packet(start + 5, packet(Ack(ping.seq)))
    assert a.health_score == 2
    assert a.next_deadline_ms() == start + CFG.probe_interval_ms


def test_relayed_ack_lowers_the_health_score() -> None:
    a, _, ping = _probe_at_health(2)
    went_indirect = a.tick(a.next_deadline_ms())
    assert any(isinstance(m, IndirectPing) for _, m in sent(went_indirect))
    a.receive_packet(a.next_deadline_ms() - 1, packet(Ack(ping.seq)))  # relayed
    assert a.health_score == 1
    assert a.state_of("n2") == MemberState.ALIVE


def test_relay_forwards_ack_or_sends_nack() -> None:
    helper = make(3)
    request = IndirectPing(77, "n2", "10.0.0.2", PORT, True, "n1", "10.0.0.1", PORT)
    batch = helper.receive_packet(10, packet(request))
    [(host, ping)] = [(h, m) for h, m in sent(batch) if isinstance(m, Ping)]
    assert host == "10.0.0.2" and isinstance(ping, Ping)
    forwarded = helper.receive_packet(20, packet(Ack(ping.seq)))
    assert ("10.0.0.1", Ack(77)) in sent(forwarded)
    helper.receive_packet(30, packet(request))
    nack = helper.tick(30 + CFG.probe_timeout_ms * 8 // 10)
    assert ("10.0.0.1", Nack(77)) in sent(nack)


def test_suspect_about_self_is_refuted() -> None:
    a = make(1)
    a.receive_packet(5, packet(Suspect(1, "n1", "n9")))
    me = a.local_member
    assert me.incarnation == 2 and me.state == MemberState.ALIVE
    assert a.stats.refutes == 1 and a.health_score == 1
    a.receive_packet(6, packet(Dead(7, "n1", "n9")))  # higher accusation
    assert a.local_member.incarnation == 8


def test_stale_rumour_is_answered_with_the_newer_alive() -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    a.receive_packet(1, packet(Alive(5, "n2", "10.0.0.2", PORT, b"")))
    batch = a.receive_packet(2, packet(Suspect(4, "n2", "n3")), ("10.0.0.3", PORT))
    assert ("10.0.0.3", Alive(5, "n2", "10.0.0.2", PORT, b"")) in sent(batch)
    assert a.state_of("n2") == MemberState.ALIVE


def test_suspicion_times_out_to_failed_with_an_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    a.receive_packet(100, packet(Suspect(1, "n2", "n3")))
    assert a.state_of("n2") == MemberState.SUSPECT
    # n = 2 members: k = 0, so the minimum timeout 4 * 1 * 1 s applies.
    assert a.next_deadline_ms() <= 4_100
    with caplog.at_level(logging.INFO, logger="cronmesh.gossip"):
        batch = a.tick(4_100)
    assert [(e.kind, e.member.name) for e in batch.events] == [(EventKind.FAILED, "n2")]
    assert "member failed node=n1 peer=n2" in caplog.text


def test_alive_with_higher_incarnation_clears_suspicion() -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    a.receive_packet(100, packet(Suspect(1, "n2", "n3")))
    a.receive_packet(200, packet(Alive(1, "n2", "10.0.0.2", PORT, b"")))
    assert a.state_of("n2") == MemberState.SUSPECT  # same incarnation: no
    a.receive_packet(300, packet(Alive(2, "n2", "10.0.0.2", PORT, b"")))
    assert a.state_of("n2") == MemberState.ALIVE
    assert a.tick(10_000).events == []


def test_dead_at_the_refuted_incarnation_is_accepted() -> None:
    # We heard n2 refute (incarnation 2); the others then suspect and
    # declare it dead at 2. An older dead message is stale, this one not.
    a, b = make(1), make(2)
    push_pull(a, b)
    a.receive_packet(100, packet(Alive(2, "n2", "10.0.0.2", PORT, b"")))
    a.receive_packet(200, packet(Dead(1, "n2", "n3")), ("10.0.0.3", PORT))
    assert a.state_of("n2") == MemberState.ALIVE
    batch = a.receive_packet(300, packet(Dead(2, "n2", "n3")), ("10.0.0.3", PORT))
    assert [(e.kind, e.member.name) for e in batch.events] == [(EventKind.FAILED, "n2")]


def test_suspicion_at_a_newer_incarnation_starts_over_there() -> None:
    # We missed n2's refutation (incarnation 2) and still suspect it at 1.
    a, b = make(1), make(2)
    push_pull(a, b)
    a.receive_packet(100, packet(Suspect(1, "n2", "n3")))
    a.receive_packet(1_000, packet(Suspect(2, "n2", "n4")))
    member = a.member("n2")
    assert member is not None
    assert (member.state, member.incarnation) == (MemberState.SUSPECT, 2)
    # Not an early verdict: the timer restarted (n = 2: the 4 s minimum).
    assert a.next_deadline_ms() <= 5_000
    assert a.tick(4_100).events == []
    failed = a.tick(5_000)
    assert [(e.kind, e.member.name) for e in failed.events] == [
        (EventKind.FAILED, "n2")
    ]
    # Our verdict carries the newer incarnation, so nobody drops it as stale.
    gossip = a.tick(a.next_deadline_ms())
    assert Dead(2, "n2", "n1") in [m for _, m in sent(failed) + sent(gossip)]


def test_set_tags_bumps_incarnation_and_peers_see_an_update() -> None:
    a, b = make(1, tags={"role": "agent"}), make(2)
    push_pull(a, b)
    assert b.member("n1").tags == {"role": "agent"}  # type: ignore[union-attr]
    a.set_tags(10, {"role": "server", "dc": "x"})
    assert a.local_member.incarnation == 2
    gossip = a.tick(a.next_deadline_ms())
    while not gossip.packets:
        gossip = a.tick(a.next_deadline_ms())
    events = b.receive_packet(a.next_deadline_ms(), gossip.packets[0].data).events
    assert [(e.kind, e.member.tags) for e in events] == [
        (EventKind.UPDATE, {"role": "server", "dc": "x"})
    ]


def test_oversized_tags_leave_state_untouched() -> None:
    a = make(1)
    with pytest.raises(ValidationError, match="1015 bytes"):
        a.set_tags(1, {"big": "x" * 1008})
    assert a.local_member.incarnation == 1 and a.local_member.meta == b""
    with pytest.raises(ValidationError, match="512"):
        make(2, tags={"big": "x" * 1008})


def test_leave_broadcasts_left_and_peers_report_leave() -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    batch = a.leave(50)
    assert a.local_member.state == MemberState.LEFT
    assert ("10.0.0.2", Dead(1, "n1", "n1")) in sent(batch)
    events = b.receive_packet(60, batch.packets[0].data).events
    assert [(e.kind, e.member.name) for e in events] == [(EventKind.LEAVE, "n1")]
    assert b.state_of("n1") == MemberState.LEFT
    now = 60
    while not a.leave_done:
        now = max(a.next_deadline_ms(), now + 1)
        a.tick(now)
        assert now < 60_000
    # A left member never probes nor refutes any more.
    assert not any(isinstance(m, Ping) for _, m in sent(a.tick(now + 5_000)))


def test_failed_member_gets_reconnects_then_is_reaped() -> None:
    config = dataclasses.replace(
        CFG, reconnect_timeout_ms=120_000, push_pull_interval_ms=0
    )
    a, b = make(1, config), make(2, config)
    push_pull(a, b)
    a.receive_packet(1, packet(Dead(1, "n2", "n3")))
    requests: list[PushPullRequest] = []
    events: list[EventKind] = []
    now = 1
    while now < 200_000:
        now = max(a.next_deadline_ms(), now + 1)
        batch = a.tick(now)
        requests += [r for r in batch.tcp_requests if isinstance(r, PushPullRequest)]
        events += [e.kind for e in batch.events]
    assert requests and all(r.host == "10.0.0.2" for r in requests)
    assert events == [EventKind.REAP]
    assert a.member("n2") is None


def test_time_must_not_go_backwards() -> None:
    a = make(1)
    a.tick(100)
    with pytest.raises(InvariantViolation, match="backwards"):
        a.tick(99)


def test_profiles_carry_memberlist_numbers() -> None:
    lan, wan, local = PROFILES["lan"], PROFILES["wan"], PROFILES["local"]
    assert (lan.probe_interval_ms, lan.probe_timeout_ms, lan.suspicion_mult) == (
        1_000,
        500,
        4,
    )
    assert (lan.retransmit_mult, lan.gossip_interval_ms, lan.gossip_nodes) == (
        4,
        200,
        3,
    )
    assert (lan.push_pull_interval_ms, lan.indirect_checks) == (30_000, 3)
    assert (wan.probe_interval_ms, wan.probe_timeout_ms, wan.suspicion_mult) == (
        5_000,
        3_000,
        6,
    )
    assert (wan.gossip_interval_ms, wan.gossip_nodes, wan.push_pull_interval_ms) == (
        500,
        4,
        60_000,
    )
    assert (local.probe_timeout_ms, local.suspicion_mult, local.indirect_checks) == (
        200,
        3,
        1,
    )
    assert (local.retransmit_mult, local.gossip_interval_ms) == (2, 100)
    assert local.push_pull_interval_ms == 15_000
    assert lan.reconnect_timeout_ms == 24 * 3_600_000
    for config in PROFILES.values():
        assert config.validate() is config
    with pytest.raises(ValidationError, match="unknown gossip profile 'moon'"):
        profile("moon")
    with pytest.raises(ValidationError, match="probe_timeout_ms"):
        dataclasses.replace(lan, probe_timeout_ms=2_000).validate()


def test_encrypted_cluster_and_an_intruder() -> None:
    keyring = Keyring([generate_key()])
    sim = Simulator(seed=1, keyring=keyring)
    sim.start_cluster(6)
    assert sim.converged()
    intruder = GossipCore(
        "evil",
        "10.9.9.9",
        PORT,
        config=CFG,
        rng=random.Random(0),
        keyring=Keyring([generate_key()]),
    )
    target = sim.nodes["m0"]
    request = intruder.join(sim.now, [(target.host, PORT)]).tcp_requests[0]
    served = target.core.receive_stream(sim.now, request.payload)
    assert served.reply is None and target.core.stats.dropped_packets == 1
    hello = encode_packet([encode_message(Alive(1, "evil", "h", 1, b""))], None)
    target.core.receive_packet(sim.now, hello)
    assert target.core.member("evil") is None
    assert target.core.stats.dropped_packets == 2


def test_join_scenario_is_deterministic() -> None:
    first = run_join_scenario(8, seed=42)
    again = run_join_scenario(8, seed=42)
    assert first.ok and first == again


# --- hostile input ------------------------------------------------------------

_names = st.sampled_from(["n1", "n2", "n3", "x", "ü"])
_inc = st.integers(0, 0xFFFFFFFF)
_port = st.integers(0, 0xFFFF)
_messages = st.one_of(
    st.builds(Ping, st.integers(0, 0xFFFFFFFF), _names, _names, _names, _port),
    st.builds(
        IndirectPing,
        st.integers(0, 0xFFFFFFFF),
        _names,
        _names,
        _port,
        st.booleans(),
        _names,
        _names,
        _port,
    ),
    st.builds(Ack, st.integers(0, 0xFFFFFFFF)),
    st.builds(Nack, st.integers(0, 0xFFFFFFFF)),
    st.builds(Alive, _inc, _names, _names, _port, st.just(b"")),
    st.builds(Suspect, _inc, _names, _names),
    st.builds(Dead, _inc, _names, _names),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_core_fed_random_bytes_never_raises(blobs: list[bytes]) -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    for i, blob in enumerate(blobs):
        a.receive_packet(i, blob)
        a.receive_stream(i, blob)
        a.tcp_result(i, 1, blob)
    assert a.stats.dropped_packets >= len(blobs)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_messages, min_size=1, max_size=5), max_size=12))
def test_core_fed_valid_but_hostile_messages_never_raises(
    packets: list[list[Message]],
) -> None:
    a, b = make(1), make(2)
    push_pull(a, b)
    now = 0
    for msgs in packets:
        now += 300
        a.receive_packet(now, packet(*msgs), ("10.0.0.7", PORT))
        a.tick(now)
        assert a.next_deadline_ms() > now - 1  # tick cleared what was due
    assert a.local_member.state == MemberState.ALIVE


def test_a_newcomer_with_a_taken_name_gets_a_conflict_and_the_owner_keeps_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner, helper = make(1), make(2)
    push_pull(helper, owner)
    twin = GossipCore("n1", "10.0.0.9", PORT, config=CFG, rng=random.Random(9))
    with caplog.at_level(logging.WARNING, logger="cronmesh.gossip"):
        served, joined = push_pull(twin, helper)
    conflicts = [e for e in joined.events if e.kind is EventKind.CONFLICT]
    assert [(e.member.name, e.member.host) for e in conflicts] == [("n1", "10.0.0.1")]
    assert not served.events, "the mesh took the newcomer in"
    assert helper.member("n1") is not None and helper.member("n1").host == "10.0.0.1"
    assert "name conflict" in caplog.text
    # The same name at the same address is a restart, not a conflict.
    again = GossipCore("n2", "10.0.0.2", PORT, config=CFG, rng=random.Random(2))
    _, rejoined = push_pull(again, owner)
    assert not [e for e in rejoined.events if e.kind is EventKind.CONFLICT]
