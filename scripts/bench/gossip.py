"""Benchmark: gossip failure detection, false positives and traffic.

Two parts, both run by default:

* ``--sim``: the deterministic simulator (cronmesh/gossip/sim.py) with 10,
  100 and 1,000 members. Per seed one cluster is started without loss; one
  member is crashed and the time until each other member reports it failed
  is recorded (detection time); then the cluster runs ``--minutes``
  simulated minutes at each ``--loss`` level in turn, counting every
  "failed" report about a member that is still running (a false positive)
  and the bytes every member sends. Big clusters get fewer simulated
  minutes and seeds by default so the whole part fits in a few minutes on
  two cores; the output says what was run. Extra ``--crash-seeds`` run the crash
  only (cheap for small clusters) to sample detection more widely: one
  crash is about one sample, as every observer hears the same verdict.
  Detection is split into the round-robin wait (crash until some member
  starts probing the victim) and the rest, which memberlist's formula
  below counts.
* ``--real``: ``--nodes`` real processes of ``python -m cronmesh.gossip.run``
  on 127.0.0.x loopback addresses, once per ``--profiles`` entry, and then
  the same number of ``swim-protocol-sync`` processes of the PyPI package
  swim-protocol (its own CLI, default timings, bound to 127.0.0.x). Each
  repetition starts a fresh cluster, waits until every member sees every
  other alive, ``kill -9``s one member (never the first, which the others
  joined through) and records, per survivor, the time until that survivor
  shows it failed (ours: status file; swim-protocol: its ``.offline/``
  link). Reports the load average, as the other engineers' test runs share
  the machine.

Next to the measured figures it prints memberlist's LAN formula: one probe
interval plus the minimum suspicion timeout ``SuspicionMult * max(1,
log10 n) * ProbeInterval`` (4 s * max(1, log10 n) + 1 s with the lan
numbers), which is what a crash costs once the suspicion has been
confirmed; Lifeguard starts the timer at ``SuspicionMaxTimeoutMult`` (6)
times that minimum and shrinks it as confirmations arrive.

Nothing is installed here: without swim-protocol the comparison says so
and prints the pip command. Every socket is bound to 127.0.0.x.

    .venv/bin/python scripts/bench/gossip.py                  # everything
    .venv/bin/python scripts/bench/gossip.py --sim --members 10 100 --json
    .venv/bin/python scripts/bench/gossip.py --real --reps 5 --profiles lan
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cronmesh.errors import InvariantViolation
from cronmesh.gossip.config import GossipConfig, profile
from cronmesh.gossip.messages import MemberState
from cronmesh.gossip.outputs import EventKind
from cronmesh.gossip.sim import (
    Simulator,
    detection_bound_ms,
    summarize,
    watch_first_probe,
)
from cronmesh.gossip.suspicion import suspicion_timeout_ms

# Simulated minutes per loss level and seeds per cluster size. Measured on
# 2 shared vCPUs at load ~6: 10 members 37 s, 100 members 2 min, 1,000
# members 10 min (mostly starting the cluster: 100 simulated s of joins).
SIM_DEFAULTS: dict[int, tuple[float, int]] = {10: (30.0, 3), 100: (3.0, 2)}
SIM_BIG = (0.5, 1)
# Extra crash-only seeds per size (no loss phases): 10 members ~0.3 s each,
# 100 members ~10 s each; none for bigger clusters by default.
CRASH_SEEDS: dict[int, int] = {10: 60, 100: 6}
POLL_S = 0.05
SWIM_CLI = "swim-protocol-sync"
# Our runners log at this level (INFO names the suspicion timers that fired);
# set from --runner-log-level.
RUNNER_LOG_LEVEL = ["INFO"]


# --- memberlist's LAN formula -------------------------------------------------


def memberlist_bound_ms(config: GossipConfig, n: int) -> dict[str, int]:
    """memberlist's detection formula for ``n`` members with ``config``.

    ``nominal``: one probe interval (the failing probe) plus the minimum
    suspicion timeout; ``max``: the probe interval plus the unconfirmed
    (maximum) suspicion timeout.
    """
    low = suspicion_timeout_ms(config.suspicion_mult, n, config.probe_interval_ms)
    high = config.suspicion_max_timeout_mult * low
    return {
        "nominal": config.probe_interval_ms + low,
        "max": config.probe_interval_ms + high,
    }


# --- simulator part -----------------------------------------------------------


@dataclass(slots=True)
class SimRun:
    """One simulated cluster: a crash, then one phase per loss level."""

    members: int
    seed: int
    minutes: float
    detection_ms: list[int] = field(default_factory=list)
    # crash until some member starts probing the victim (round-robin wait)
    first_probe_ms: int | None = None
    undetected: int = 0
    # per loss level: false "failed" reports, distinct members wrongly failed,
    # bytes sent per member per second
    false_positives: dict[float, int] = field(default_factory=dict)
    wrongly_failed: dict[float, int] = field(default_factory=dict)
    bytes_per_member_s: dict[float, float] = field(default_factory=dict)
    error: str = ""
    wall_s: float = 0.0


def sim_run(
    n: int, seed: int, losses: list[float], minutes: float, config: GossipConfig
) -> SimRun:
    """Start ``n`` members, crash one, then run each loss level in turn."""
    started = time.monotonic()
    run = SimRun(n, seed, minutes)
    sim = Simulator(seed=seed, config=config)
    try:
        sim.start_cluster(n)
    except InvariantViolation as exc:
        run.error = str(exc)
        return run
    rng = random.Random(f"bench-{seed}")
    sim.run_until(sim.now + rng.randrange(config.probe_interval_ms))
    victim = f"m{rng.randrange(1, n)}"
    crashed_at, mark = sim.now, len(sim.observations)
    sim.crash(victim)
    probed = watch_first_probe(sim, victim)
    first, rest = detection_bound_ms(config, n)
    sim.run_until_true(
        crashed_at + first + rest, lambda: sim.all_see(victim, MemberState.DEAD)
    )
    # One pass over the new observations (first_observation would rescan
    # the ~n^2 join events of the start for every observer).
    seen: dict[str, int] = {}
    for obs in sim.observations[mark:]:
        if obs.kind == EventKind.FAILED and obs.subject == victim:
            seen.setdefault(obs.observer, obs.time_ms - crashed_at)
    live = [node.name for node in sim.live()]
    run.detection_ms = [seen[name] for name in live if name in seen]
    run.undetected = len(live) - len(run.detection_ms)
    run.first_probe_ms = probed[0] - crashed_at if probed else None
    running = set(live)
    for loss in losses:
        sim.loss = loss
        mark, start = len(sim.observations), sim.now
        sent = sum(node.bytes_sent for node in sim.nodes.values())
        sim.run_until(start + int(minutes * 60_000))
        wrong = [
            obs
            for obs in sim.observations[mark:]
            if obs.kind == EventKind.FAILED and obs.subject in running
        ]
        run.false_positives[loss] = len(wrong)
        run.wrongly_failed[loss] = len({obs.subject for obs in wrong})
        total = sum(node.bytes_sent for node in sim.nodes.values()) - sent
        seconds = max(sim.now - start, 1) / 1000
        run.bytes_per_member_s[loss] = round(total / len(running) / seconds, 1)
    run.wall_s = round(time.monotonic() - started, 1)
    return run


def sim_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every size; one summary row per size."""
    config = profile("lan")
    rows = []
    for n in args.members:
        minutes, seeds = SIM_DEFAULTS.get(n, SIM_BIG)
        minutes = args.minutes if args.minutes is not None else minutes
        seeds = args.seeds if args.seeds is not None else seeds
        crash_seeds = CRASH_SEEDS.get(n, 0)
        if args.crash_seeds is not None:
            crash_seeds = args.crash_seeds
        runs, crash_runs = [], []
        for seed in range(seeds + crash_seeds):
            losses = args.loss if seed < seeds else []
            run = sim_run(n, seed, losses, minutes, config)
            _log(
                f"sim n={n} seed={seed}: {run.wall_s}s wall"
                + (f" ERROR {run.error}" if run.error else "")
            )
            (runs if seed < seeds else crash_runs).append(run)
        row = _sim_row(n, minutes, seeds, args.loss, runs, config)
        row.update(_crash_row(runs + crash_runs))
        rows.append(row)
    return rows


def _sim_row(
    n: int,
    minutes: float,
    seeds: int,
    losses: list[float],
    runs: list[SimRun],
    config: GossipConfig,
) -> dict[str, Any]:
    detection = [ms for run in runs for ms in run.detection_ms]
    median, p99 = summarize(detection)
    ok_runs = [run for run in runs if not run.error]
    member_hours = sum((run.members - 1) * minutes / 60 for run in ok_runs)
    per_loss = {}
    for loss in losses:
        fps = sum(run.false_positives.get(loss, 0) for run in ok_runs)
        rates = [run.bytes_per_member_s[loss] for run in ok_runs]
        per_loss[str(loss)] = {
            "false_positives": fps,
            "members_wrongly_failed": sum(
                run.wrongly_failed.get(loss, 0) for run in ok_runs
            ),
            "false_positives_per_member_hour": round(fps / member_hours, 4)
            if member_hours
            else None,
            "bytes_per_member_per_s": round(sum(rates) / len(rates), 1)
            if rates
            else None,
        }
    return {
        "members": n,
        "seeds": seeds,
        "simulated_minutes_per_loss_level": minutes,
        "member_hours_per_loss_level": round(member_hours, 2),
        "detection_samples": len(detection),
        "undetected": sum(run.undetected for run in runs),
        "detection_ms_median": median,
        "detection_ms_p99": p99,
        "detection_ms_max": max(detection, default=0),
        "memberlist_lan_ms": memberlist_bound_ms(config, n),
        "loss": per_loss,
        "errors": [run.error for run in runs if run.error],
        "wall_s": round(sum(run.wall_s for run in runs), 1),
    }


def _crash_row(runs: list[SimRun]) -> dict[str, Any]:
    """Detection over every crash (loss seeds and crash-only seeds), split
    into the round-robin wait and what follows the first probe."""
    detection = [ms for run in runs for ms in run.detection_ms]
    waits = [run.first_probe_ms for run in runs if run.first_probe_ms is not None]
    after = [
        ms - run.first_probe_ms
        for run in runs
        if run.first_probe_ms is not None
        for ms in run.detection_ms
    ]
    median, p99 = summarize(detection)
    return {
        "crashes": len(runs),
        "detection_samples": len(detection),
        "undetected": sum(run.undetected for run in runs),
        "detection_ms_median": median,
        "detection_ms_p99": p99,
        "detection_ms_max": max(detection, default=0),
        "first_probe_ms_median": summarize(waits)[0],
        "first_probe_ms_max": max(waits, default=0),
        "after_first_probe_ms_median": summarize(after)[0],
        "after_first_probe_ms_max": max(after, default=0),
    }


# --- real processes -----------------------------------------------------------


def _free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (bounded retries)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host}")


@dataclass(slots=True)
class Member:
    """One started process and how to read what it believes."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    # name -> (status, time the status was taken), None before it reports
    read: Callable[[], dict[str, tuple[str, float]] | None]


class Cluster:
    """Processes started by one repetition; always stopped by ``close``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.members: list[Member] = []

    def start(self, name: str, host: str, port: int, cmd: list[str], read: Any) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.members.append(Member(name, host, port, proc, read))

    def close(self) -> None:
        for member in self.members:
            if member.proc.poll() is None:
                member.proc.kill()
        for member in self.members:
            try:
                member.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _log(f"pid {member.proc.pid} did not exit after SIGKILL")

    def died(self) -> list[str]:
        return [m.name for m in self.members if m.proc.poll() is not None]


def _ours_reader(path: Path) -> Callable[[], dict[str, tuple[str, float]] | None]:
    def read() -> dict[str, tuple[str, float]] | None:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        when = float(status["time"])
        return {m["name"]: (m["status"], when) for m in status["members"]}

    return read


def _swim_reader(base: Path) -> Callable[[], dict[str, tuple[str, float]] | None]:
    # swim-protocol-sync keeps one symlink per member in .online/, .suspect/
    # and .offline/; the link's own mtime is when that status was entered.
    def read() -> dict[str, tuple[str, float]] | None:
        if not base.is_dir():
            return None
        seen: dict[str, tuple[str, float]] = {}
        for folder, status in ((".online", "alive"), (".suspect", "suspect")):
            for entry in _scan(base / folder):
                seen[entry.name] = (status, entry.stat(follow_symlinks=False).st_mtime)
        for entry in _scan(base / ".offline"):
            seen[entry.name] = ("failed", entry.stat(follow_symlinks=False).st_mtime)
        return seen

    return read


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _start_ours(
    cluster: Cluster, hosts: list[str], prof: str, workdir: Path
) -> list[str]:
    names = [f"n{i}" for i in range(len(hosts))]
    seed = ""
    for name, host in zip(names, hosts, strict=True):
        port = _free_port(host)
        status = workdir / f"{name}.json"
        cmd = [
            sys.executable,
            "-m",
            "cronmesh.gossip.run",
            "--name",
            name,
            "--bind",
            f"{host}:{port}",
            "--profile",
            prof,
            "--status-file",
            str(status),
            "--log-level",
            RUNNER_LOG_LEVEL[0],
            "--status-interval",
            "0.1",
        ]
        if seed:
            cmd += ["--join", seed]
        else:
            seed = f"{host}:{port}"
        cluster.start(name, host, port, cmd, _ours_reader(status))
    return names


def _swim_cli() -> Path | None:
    path = Path(sys.executable).parent / SWIM_CLI
    return path if path.exists() else None


def _start_swim(
    cluster: Cluster, hosts: list[str], _prof: str, workdir: Path
) -> list[str]:
    cli = _swim_cli()
    assert cli is not None
    names = [f"{host}:{_free_port(host)}" for host in hosts]
    for name in names:
        host, port = name.rsplit(":", 1)
        base = workdir / name.replace(":", "_")
        cmd = [str(cli), "--name", name, "--secret", "cronmesh-bench"]
        for peer in names:
            if peer != name:
                cmd += ["--peer", peer]
        cluster.start(name, host, int(port), [*cmd, str(base)], _swim_reader(base))
    return names


def _converged(cluster: Cluster, names: list[str]) -> bool:
    for member in cluster.members:
        view = member.read()
        if view is None:
            return False
        for name in names:
            if name != member.name and view.get(name, ("",))[0] != "alive":
                return False
    return True


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(POLL_S)
    return cond()


@dataclass(slots=True)
class Repetition:
    victim: str = ""
    converge_s: float = 0.0
    detection_s: list[float] = field(default_factory=list)
    first_suspect_s: float | None = None
    # ours only: confirmations of each survivor whose own suspicion timer
    # fired (the others learned of the death by gossip first)
    timer_confirmations: list[int] = field(default_factory=list)
    workdir: str = ""  # kept logs and status files (--keep)
    by_survivor: dict[str, float] = field(default_factory=dict)
    undetected: int = 0
    false_positives: list[str] = field(default_factory=list)
    error: str = ""


def real_repetition(
    start: Callable[[Cluster, list[str], str, Path], list[str]],
    hosts: list[str],
    prof: str,
    rng: random.Random,
    timeout: float,
    keep_dir: str | None = None,
) -> Repetition:
    """Start a cluster, kill -9 one member, time each survivor's detection."""
    rep = Repetition()
    if keep_dir:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cronmesh-gossip-bench-", dir=keep_dir))
    rep.workdir = str(workdir) if keep_dir else ""
    cluster = Cluster(workdir)
    try:
        began = time.monotonic()
        names = start(cluster, hosts, prof, workdir)
        if not _wait(lambda: _converged(cluster, names), 60):
            rep.error = f"no convergence in 60 s (exited: {cluster.died()})"
            return rep
        rep.converge_s = round(time.monotonic() - began, 1)
        time.sleep(2.0)  # let join traffic settle
        victim = cluster.members[rng.randrange(1, len(cluster.members))]
        rep.victim = victim.name
        survivors = [m for m in cluster.members if m is not victim]
        killed_at = time.time()
        os.kill(victim.proc.pid, signal.SIGKILL)
        failed: dict[str, float] = {}
        suspected: list[float] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(failed) < len(survivors):
            for member in survivors:
                view = member.read() or {}
                status, when = view.get(victim.name, ("", 0.0))
                if status == "suspect" and not suspected:
                    suspected.append(when - killed_at)
                if status == "failed" and member.name not in failed:
                    failed[member.name] = when - killed_at
                for other, (state, _) in view.items():
                    wrong = other != victim.name and other in names
                    if wrong and state == "failed":
                        note = f"{member.name} failed {other}"
                        if note not in rep.false_positives:
                            rep.false_positives.append(note)
            time.sleep(POLL_S)
        rep.detection_s = sorted(round(s, 3) for s in failed.values())
        rep.by_survivor = {k: round(v, 3) for k, v in sorted(failed.items())}
        rep.first_suspect_s = round(suspected[0], 3) if suspected else None
        rep.undetected = len(survivors) - len(failed)
        rep.timer_confirmations = _timer_confirmations(cluster, victim.name)
        gone = [n for n in cluster.died() if n != victim.name]
        if gone:
            rep.error = f"members exited during the run: {gone}"
    finally:
        cluster.close()
        if not keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return rep


def _timer_confirmations(cluster: Cluster, victim: str) -> list[int]:
    """Parse our runners' INFO logs for "suspect timeout ... confirmations=N"."""
    found = []
    for log in sorted(cluster.workdir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "suspect timeout" in line and f"peer={victim} " in line:
                found.append(int(line.rsplit("confirmations=", 1)[1].split()[0]))
    return found


def real_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Ours per profile, then swim-protocol; one summary row each."""
    hosts = [f"127.0.0.{args.host_start + i}" for i in range(args.nodes)]
    rng = random.Random(args.rng_seed)
    systems: list[tuple[str, str, Any]] = [
        (f"cronmesh ({p})", p, _start_ours) for p in args.profiles
    ]
    if not args.no_swim:
        systems.append(("swim-protocol 0.6.3 defaults", "", _start_swim))
    rows = []
    for label, prof, start in systems:
        row: dict[str, Any] = {"system": label, "nodes": args.nodes}
        if start is _start_swim:
            row.update(_swim_info())
            if _swim_cli() is None:
                row["error"] = (
                    f"{SWIM_CLI} not found next to {sys.executable}; install it"
                    f" with: {sys.executable} -m pip install swim-protocol"
                )
                rows.append(row)
                continue
        else:
            row["memberlist_lan_ms"] = memberlist_bound_ms(profile("lan"), args.nodes)
            row["profile_formula_ms"] = memberlist_bound_ms(profile(prof), args.nodes)
        row["load_before"] = _load()
        reps = []
        for i in range(args.reps):
            rep = real_repetition(start, hosts, prof, rng, args.timeout, args.keep)
            _log(
                f"real {label} rep {i}: victim {rep.victim} detection"
                f" {rep.detection_s} suspect@{rep.first_suspect_s}"
                f" fp={rep.false_positives} {rep.error}"
            )
            reps.append(rep)
        row["load_after"] = _load()
        samples = [s for rep in reps for s in rep.detection_s]
        median, p99 = summarize([round(s * 1000) for s in samples])
        suspects = [r.first_suspect_s for r in reps if r.first_suspect_s is not None]
        row.update(
            {
                "repetitions": args.reps,
                "detection_samples": len(samples),
                "detection_ms_median": median,
                "detection_ms_p99": p99,
                "detection_ms_min": round(min(samples, default=0) * 1000),
                "detection_ms_max": round(max(samples, default=0) * 1000),
                "first_suspect_ms_median": summarize(
                    [round(s * 1000) for s in suspects]
                )[0],
                "undetected": sum(rep.undetected for rep in reps),
                "timer_confirmations": [
                    c for rep in reps for c in rep.timer_confirmations
                ],
                "false_positives": sum(len(rep.false_positives) for rep in reps),
                "errors": [rep.error for rep in reps if rep.error],
                "runs": [asdict(rep) for rep in reps],
            }
        )
        rows.append(row)
    return rows


def _swim_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        from importlib.metadata import version

        from swimprotocol.config import BaseConfig  # type: ignore[import-not-found]
    except ImportError:
        return info
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(BaseConfig.__init__).parameters.items()
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }
    info["swim_protocol_version"] = version("swim-protocol")
    info["swim_protocol_defaults_s"] = defaults
    info["system"] = f"swim-protocol {info['swim_protocol_version']} defaults"
    return info


# --- output -------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}"


def print_sim(rows: list[dict[str, Any]], losses: list[float]) -> None:
    print("Simulator (lan profile; detection at 0% loss; FP = false 'failed')")
    head = "members seeds min/loss  det.med  det.p99  ML-LAN"
    head += "".join(f"  FP/mh@{loss:.0%}" for loss in losses)
    head += "  B/member/s at each loss"
    print(head)
    for row in rows:
        line = (
            f"{row['members']:>7} {row['seeds']:>5}"
            f" {row['simulated_minutes_per_loss_level']:>8g}"
            f" {_s(row['detection_ms_median']):>7}s {_s(row['detection_ms_p99']):>7}s"
            f" {_s(row['memberlist_lan_ms']['nominal']):>6}s"
        )
        for loss in losses:
            cell = row["loss"][str(loss)]
            rate = cell["false_positives_per_member_hour"]
            text = "-" if rate is None else f"{rate:g} ({cell['false_positives']})"
            line += f" {text:>10}"
        rates = [row["loss"][str(loss)]["bytes_per_member_per_s"] for loss in losses]
        line += "  " + " / ".join(f"{rate:g}" for rate in rates if rate is not None)
        print(line)
        print(
            f"        {row['crashes']} crashes: round-robin wait median"
            f" {_s(row['first_probe_ms_median'])} s (max"
            f" {_s(row['first_probe_ms_max'])} s), then median"
            f" {_s(row['after_first_probe_ms_median'])} s (max"
            f" {_s(row['after_first_probe_ms_max'])} s) to detection"
        )
        for error in row["errors"]:
            print(f"        error: {error}")
        if row["undetected"]:
            print(f"        {row['undetected']} observers never reported the crash")
    print(
        "  FP/mh = false 'failed' reports per member-hour (total in brackets);"
        " B/member/s = UDP bytes; ML-LAN = memberlist's formula (probe interval"
        " + minimum suspicion timeout); min/loss = simulated minutes per loss"
        " level (fewer for big clusters: see --minutes, --seeds); detection"
        " over the loss seeds plus --crash-seeds crash-only seeds; round-robin"
        " wait = crash until some member starts probing the victim"
    )


def print_real(rows: list[dict[str, Any]]) -> None:
    print("Real processes on 127.0.0.x (kill -9 one member; per-survivor times)")
    print(
        "system                         samples det.med det.p99 det.min det.max"
        " 1st-susp  FP  load before/after"
    )
    for row in rows:
        if "error" in row and "detection_samples" not in row:
            print(f"{row['system']:<30} NOT RUN: {row['error']}")
            continue
        print(
            f"{row['system']:<30} {row['detection_samples']:>7}"
            f" {_s(row['detection_ms_median']):>6}s {_s(row['detection_ms_p99']):>6}s"
            f" {_s(row['detection_ms_min']):>6}s {_s(row['detection_ms_max']):>6}s"
            f" {_s(row['first_suspect_ms_median']):>7}s {row['false_positives']:>3}"
            f"  {row['load_before'][0]}/{row['load_after'][0]}"
        )
        for error in row["errors"]:
            print(f"    error: {error}")
        if row["undetected"]:
            print(f"    {row['undetected']} survivors never showed the kill")
        if "memberlist_lan_ms" in row:
            ml, own = row["memberlist_lan_ms"], row["profile_formula_ms"]
            print(
                f"    memberlist lan formula for {row['nodes']}: "
                f"{_s(ml['nominal'])} s (unconfirmed max {_s(ml['max'])} s);"
                f" same formula with this profile: {_s(own['nominal'])} s"
            )
        if row.get("timer_confirmations"):
            confs = row["timer_confirmations"]
            print(
                f"    own suspicion timer fired on {len(confs)} of"
                f" {row['detection_samples']} detections; confirmations then:"
                f" {dict(sorted(Counter(confs).items()))}"
            )
        if "swim_protocol_defaults_s" in row:
            print(f"    swim-protocol timings (s): {row['swim_protocol_defaults_s']}")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="run the simulator part")
    parser.add_argument("--real", action="store_true", help="run real processes")
    parser.add_argument("--members", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--loss", type=float, nargs="+", default=[0.0, 0.05, 0.10, 0.20]
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="simulated minutes per loss level (default: 30 / 3 / 0.5 by size)",
    )
    parser.add_argument("--seeds", type=int, help="seeds per size (3 / 2 / 1)")
    parser.add_argument(
        "--crash-seeds",
        type=int,
        help="extra crash-only seeds per size (60 / 6 / 0)",
    )
    parser.add_argument("--nodes", type=int, default=10, help="real processes")
    parser.add_argument("--reps", type=int, default=3, help="kills per system")
    parser.add_argument("--profiles", nargs="+", default=["lan", "local"])
    parser.add_argument("--no-swim", action="store_true", help="skip swim-protocol")
    parser.add_argument(
        "--host-start", type=int, default=101, help="first host 127.0.0.N"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait per kill"
    )
    parser.add_argument("--rng-seed", type=int, default=1, help="victim choice")
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep each repetition's logs and status files under DIR",
    )
    parser.add_argument(
        "--runner-log-level", default="INFO", help="our runners' --log-level"
    )
    parser.add_argument("--json", action="store_true", help="print JSON to stdout")
    args = parser.parse_args(argv)
    if not args.sim and not args.real:
        args.sim = args.real = True
    if min(args.members) < 3 or not all(0 <= x < 1 for x in args.loss):
        parser.error("need --members >= 3 and 0 <= --loss < 1")
    if not 3 <= args.nodes <= 50 or not 1 <= args.host_start <= 254 - args.nodes:
        parser.error("need 3 <= --nodes <= 50 and hosts within 127.0.0.1-254")
    if args.crash_seeds is not None and args.crash_seeds < 0:
        parser.error("need --crash-seeds >= 0")
    if args.reps < 1 or args.timeout <= 0:
        parser.error("need --reps >= 1 and --timeout > 0")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    RUNNER_LOG_LEVEL[0] = args.runner_log_level
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_start": _load(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
    }
    if args.sim:
        report["sim"] = sim_part(args)
    if args.real:
        report["real"] = real_part(args)
    report["load_end"] = _load()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['date']}  cpus={report['cpus']}  load={report['load_start']}")
    if args.sim:
        print_sim(report["sim"], args.loss)
    if args.real:
        print_real(report["real"])
    print(f"load at end: {report['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
