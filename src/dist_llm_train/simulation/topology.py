"""Cluster topologies for the simulator: who the workers are, how fast they compute, and their links.

A topology is YAML in the shape of the issue's example, one entry per worker *kind* (``count`` copies)::

    name: multi-region
    workers:
      - {name: us-east, bandwidth_mbps: 1000, latency_ms: 50}
      - {name: edge-device, bandwidth_mbps: 10, latency_ms: 500, count: 4}

Optional per entry (defaults in brackets):

- ``up_mbps`` / ``down_mbps`` [``bandwidth_mbps``]: asymmetric links (a home uplink is often 10x slower
  than its downlink; uploads of updates then dominate and compression pays most).
- ``latency_ms`` [0]: one-way delay. ``jitter_ms`` [0]: each message's delay is drawn uniformly from
  ``latency ± jitter`` (never below 0).
- ``loss`` [0]: probability that one transmission of a message is lost; the sender resends the whole
  message after ``rto_ms`` [max(200, 2·latency + 4·jitter), TCP's minimum RTO and its RTT rule]. High
  loss shows up as retransmissions in the report and as long pull/push times.
- ``speed`` [1.0]: relative compute speed (2.0 computes a task in half the time of a speed-1.0 worker).
  ``speed_jitter`` [0]: each task's compute time is multiplied by a factor drawn from ``1 ± speed_jitter``.
- ``crash``: list of ``{at_s, down_s}``: the worker dies at ``at_s`` (losing its in-flight work) and comes
  back ``down_s`` seconds later as a fresh process (``down_s`` omitted: it never comes back).
- ``role`` [honest]: ``byzantine`` workers compute an honest update, then send what ``attack`` (a name from
  the attack catalogue, with ``attack_params``) makes of it.

Entries with ``count > 1`` expand to workers ``<name>-0 … <name>-<count-1>``. Presets live in
``configs/topologies/`` (``lan``, ``hetero-3tier``, ``multi-region``); :func:`load_topology` takes a preset
name or a file path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_llm_train.errors import ConfigError

__all__ = [
    "TOPOLOGY_DIRS",
    "CrashSpec",
    "Topology",
    "WorkerProfile",
    "WorkerSpec",
    "available_topologies",
    "default_topology",
    "load_topology",
    "parse_topology",
]

# Presets ship in the repository's configs/topologies (the checkout an editable install points at); a
# configs/topologies in the working directory is searched too, so a user's own presets work alike.
TOPOLOGY_DIRS = (
    Path(__file__).resolve().parents[3] / "configs" / "topologies",
    Path("configs") / "topologies",
)

# LAN defaults for workers built from cluster.workers without a topology: 10 Gbit/s, 0.2 ms.
LAN_MBPS = 10_000.0
LAN_LATENCY_MS = 0.2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CrashSpec(_Strict):
    """One crash: down at ``at_s`` (virtual seconds from the start), back after ``down_s`` (None: never)."""

    at_s: float = Field(ge=0.0, allow_inf_nan=False)
    down_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


class WorkerSpec(_Strict):
    """One worker kind of a topology (see the module docstring for every field)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    count: int = Field(default=1, ge=1, le=100_000)
    bandwidth_mbps: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    up_mbps: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    down_mbps: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    latency_ms: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    jitter_ms: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    loss: float = Field(default=0.0, ge=0.0, le=0.9, description="probability one transmission is lost")
    rto_ms: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    speed: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    speed_jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    crash: list[CrashSpec] = Field(default_factory=list)
    role: Literal["honest", "byzantine"] = "honest"
    attack: str | None = None
    attack_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSpec:
        if self.bandwidth_mbps is None and (self.up_mbps is None or self.down_mbps is None):
            raise ValueError(f"worker {self.name!r} needs bandwidth_mbps (or both up_mbps and down_mbps)")
        if self.role == "byzantine" and self.attack is None:
            raise ValueError(
                f"worker {self.name!r} has role byzantine but no attack; name one, e.g. attack: alie"
            )
        if self.role == "honest" and (self.attack is not None or self.attack_params):
            raise ValueError(
                f"worker {self.name!r} names an attack but its role is honest; set role: byzantine"
            )
        end = 0.0
        for crash in self.crash:
            if crash.at_s < end:
                raise ValueError(
                    f"worker {self.name!r}: crash at_s={crash.at_s} begins before the previous one ends "
                    f"({end} s); list crashes in time order without overlap"
                )
            end = float("inf") if crash.down_s is None else crash.at_s + crash.down_s
        return self


class Topology(_Strict):
    """A cluster: a name and worker kinds (expanded to individual workers by :meth:`profiles`)."""

    name: str = "custom"
    description: str = ""
    workers: list[WorkerSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Topology:
        names = [p.name for p in self.profiles()]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(
                    f"worker name {name!r} occurs twice after expanding counts; give each entry its own name"
                )
            seen.add(name)
        return self

    @property
    def n_workers(self) -> int:
        return sum(w.count for w in self.workers)

    def profiles(self) -> list[WorkerProfile]:
        """One :class:`WorkerProfile` per worker, in file order (``count`` copies named ``<name>-<i>``)."""
        out = []
        for spec in self.workers:
            for i in range(spec.count):
                name = spec.name if spec.count == 1 else f"{spec.name}-{i}"
                out.append(WorkerProfile.from_spec(spec, name))
        return out

    def with_bandwidth(self, mbps: float) -> Topology:
        """The same topology with every link (both directions) set to ``mbps`` (e.g. a 10 Mbit/s study)."""
        if not mbps > 0:
            raise ConfigError(f"bandwidth override {mbps} Mbit/s must be > 0")
        workers = [
            w.model_copy(update={"bandwidth_mbps": float(mbps), "up_mbps": None, "down_mbps": None})
            for w in self.workers
        ]
        return self.model_copy(update={"workers": workers, "name": f"{self.name}@{mbps:g}mbps"})


@dataclass(frozen=True)
class WorkerProfile:
    """One worker as the simulator uses it: link in bit/s and seconds, speed, crashes, role."""

    name: str
    up_bps: float
    down_bps: float
    latency_s: float
    jitter_s: float
    loss: float
    rto_s: float
    speed: float
    speed_jitter: float
    crashes: tuple[tuple[float, float | None], ...] = ()
    byzantine: bool = False
    attack: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: WorkerSpec, name: str) -> WorkerProfile:
        bw = spec.bandwidth_mbps
        up = spec.up_mbps if spec.up_mbps is not None else bw
        down = spec.down_mbps if spec.down_mbps is not None else bw
        assert up is not None and down is not None, "validated by WorkerSpec"
        latency = spec.latency_ms / 1000.0
        jitter = spec.jitter_ms / 1000.0
        rto = spec.rto_ms / 1000.0 if spec.rto_ms is not None else max(0.2, 2 * latency + 4 * jitter)
        return cls(
            name=name,
            up_bps=up * 1e6,
            down_bps=down * 1e6,
            latency_s=latency,
            jitter_s=jitter,
            loss=spec.loss,
            rto_s=rto,
            speed=spec.speed,
            speed_jitter=spec.speed_jitter,
            crashes=tuple((c.at_s, c.down_s) for c in spec.crash),
            byzantine=spec.role == "byzantine",
            attack=spec.attack,
            attack_params=dict(spec.attack_params),
        )

    @property
    def link_mbps(self) -> float:
        """The slower direction in Mbit/s (what the scheduler's cost model charges transfers against)."""
        return min(self.up_bps, self.down_bps) / 1e6


def _format_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "topology"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        problems.append(msg if isinstance(value, dict) else f"{where}={value!r}: {msg}")
    return f"invalid topology {source}: " + "; ".join(problems)


def parse_topology(data: Any, source: str = "<mapping>") -> Topology:
    """Validate a mapping (parsed YAML) into a :class:`Topology`; errors name the field (ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"topology {source} must be a mapping with a 'workers' list, not {type(data).__name__}"
        )
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def _preset_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in TOPOLOGY_DIRS:
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def available_topologies() -> list[str]:
    """Names of the topology presets (usable as ``--topology NAME``)."""
    return sorted(_preset_files())


def load_topology(name_or_path: str | Path) -> Topology:
    """Load a topology preset by name (``lan``, ``hetero-3tier``, ``multi-region``) or a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = _preset_files().get(str(name_or_path))
        if preset is None:
            known = ", ".join(available_topologies()) or "none"
            raise ConfigError(f"topology '{name_or_path}' is neither a file nor a preset (presets: {known})")
        path = preset
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"topology file {path} is not valid YAML{where}: fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"cannot read topology file {path}: {exc.strerror}") from None
    topology = parse_topology(data, str(path))
    if "name" not in data:
        topology = topology.model_copy(update={"name": path.stem})
    return topology


def default_topology(n_workers: int, speeds: list[float] | None = None) -> Topology:
    """``n_workers`` workers on a LAN (10 Gbit/s, 0.2 ms), with relative ``speeds`` when given."""
    if speeds is not None and len(speeds) != n_workers:
        raise ConfigError(f"cluster.speeds has {len(speeds)} entries but there are {n_workers} workers")
    if speeds is not None and not all(s > 0 and s < float("inf") for s in speeds):
        raise ConfigError(f"cluster.speeds={speeds}: every relative speed must be a finite number > 0")
    workers = [
        WorkerSpec(
            name=f"worker-{i}",
            bandwidth_mbps=LAN_MBPS,
            latency_ms=LAN_LATENCY_MS,
            speed=1.0 if speeds is None else speeds[i],
        )
        for i in range(n_workers)
    ]
    return Topology(name=f"lan-{n_workers}", workers=workers)
