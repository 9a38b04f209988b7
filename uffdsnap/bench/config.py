"""What a bench run measures: the modes, the targets, the sizes, and the plan of sessions."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

# How our snapshot runs: mode name -> keyword arguments for Coordinator(...). Adding a mode is
# one line here; every scenario then measures it beside the others.
MODES: dict[str, dict[str, Any]] = {
    "agents": {},  # one agent process per mapper; faults and un-protects travel as messages
    "delegated": {"delegate": True},  # agents hand their uffds to the coordinator
}

# The targets from the issue. Fault-service p50 targets are per mode (x native handler p50).
FAULT_P50_TARGET: dict[str, float] = {"agents": 3.0, "delegated": 1.5}
FAULT_P99_TARGET = 10.0          # our p99 <= 10x the native handler's p50
FAULT_P99_NATIVE_TARGET = 3.0    # our p99 <= 3x the native handler's p99 (issue 11)
START_PAUSE_TARGET = 1.1         # our start pause <= 1.1x the kernel's protect time
COPY_TARGET = 0.9                # our copy throughput >= 0.9x a raw copy
WORKLOAD_TARGET = 0.5            # workload throughput during the snapshot >= 0.5x undisturbed
RSS_TARGET_BYTES = 100 * MiB     # coordinator peak RSS <= 100 MiB ...
RSS_TARGET_AT = 4 * GiB          # ... with a 4 GiB object

KINDS = ("shmem", "hugetlb")
# The bench's parts (`uffdsnap bench --only`): the sessions (start pause, fault service, copy,
# workload, scaling), time to T, streaming, incremental snapshots.
PARTS = ("sessions", "time-to-t", "streaming", "incremental")
HUGE_PAGE = 2 * MiB


def parse_size(text: str) -> int:
    """'256M', '4G', '64MiB', '1048576' -> bytes (ValueError otherwise)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 256M, 4G)")
    scale = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    value = int(m.group(1)) * scale
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def size_label(n: int) -> str:
    """Short label: 64M, 1G, 4G."""
    for unit, scale in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on. `quick()` and `default()` are the two presets."""

    quick: bool = False
    sizes: tuple[int, ...] = (256 * MiB, 1 * GiB, 4 * GiB)   # scaling by size, at 1 process
    procs: tuple[int, ...] = (1, 8, 64)                     # scaling by processes, at sizes[0]
    pause_procs: tuple[int, ...] = (1, 8)                   # start pause / fault service
    kinds: tuple[str, ...] = KINDS
    copy_size: int = 1 * GiB                                # the idle-copy scenario
    modes: tuple[str, ...] = tuple(MODES)
    rate: float = 4000.0        # total writes/s of the paced writers (split over processes)
    warmup_s: float = 0.5       # writers run undisturbed before the first event
    gap_s: float = 0.5          # between events (the window before each is its baseline)
    hugetlb_size: int = 256 * MiB
    dest_dir: str | None = None
    out_dir: str | None = None
    reserve_hugepages: bool = False
    plots: bool = True
    timeout_s: float = 600.0    # for one snapshot
    # The priority of our snapshot and of the native handler: the one `uffdsnap snapshot`
    # takes by default (as root), so the bench measures what users run, and both sides of a
    # ratio get the same share of a busy machine's CPUs.
    nice: int = -10             # (uffdsnap.cli.DEFAULT_NICE: the CLI imports the bench)
    parts: tuple[str, ...] = PARTS

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> BenchConfig:
        base: dict[str, Any] = {}
        if quick:
            base = {"quick": True, "sizes": (64 * MiB,), "procs": (1, 2), "pause_procs": (1,),
                    "copy_size": 64 * MiB, "hugetlb_size": 32 * MiB, "warmup_s": 0.25,
                    "gap_s": 0.25, "timeout_s": 120.0}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def base_size(self) -> int:
        """The object size of the start-pause, fault-service and throughput sessions."""
        return self.sizes[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Session:
    """Writers on one object, and the events (snapshots or copies) run against them in turn.

    Events: "stw" (stop the world + copy), "native" (the C reference handler), "raw" (a plain
    copy, nothing stopped), and one per mode of ours (the mode's name).
    """

    name: str
    kind: str
    size: int
    procs: int
    rate: float | None          # total writes/s; None = as fast as possible
    probe: bool                 # writers flag the stores that hit a write-protected page
    idle: bool                  # writers map the object and do not write
    events: tuple[str, ...]
    purposes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.kind} {size_label(self.size)} x{self.procs}"


def plan(cfg: BenchConfig) -> list[Session]:
    """The sessions of a run, each object/process configuration once, in running order."""
    sessions: list[Session] = []
    snaps = ("stw", "native", *cfg.modes)
    by_key: dict[tuple[str, int, int], Session] = {}

    def add(kind: str, size: int, procs: int, purpose: str) -> None:
        key = (kind, size, procs)
        old = by_key.get(key)
        if old is not None:
            if purpose in old.purposes:
                return
            new = Session(old.name, kind, size, procs, old.rate, old.probe, old.idle,
                          old.events, (*old.purposes, purpose))
            sessions[sessions.index(old)] = new
            by_key[key] = new
            return
        s = Session(f"{kind}-{size_label(size)}-x{procs}", kind, size, procs, cfg.rate, True,
                    False, snaps, (purpose,))
        sessions.append(s)
        by_key[key] = s

    for kind in cfg.kinds:
        size = cfg.base_size if kind == "shmem" else cfg.hugetlb_size
        for p in cfg.pause_procs:
            add(kind, size, p, "start_pause")
    for size in cfg.sizes:
        add("shmem", size, 1, "scaling")
    for p in cfg.procs:
        add("shmem", cfg.base_size, p, "scaling")
    sessions.append(Session(f"throughput-{size_label(cfg.base_size)}", "shmem", cfg.base_size, 1,
                            None, False, False, snaps, ("workload", "timeline")))
    sessions.append(Session(f"idle-{size_label(cfg.copy_size)}", "shmem", cfg.copy_size, 1, None,
                            False, True, ("raw", "native", *cfg.modes), ("copy",)))
    return sessions
