"""Topology YAML: the issue's example, presets, per-worker options, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dist_llm_train.config import load_config
from dist_llm_train.errors import ConfigError
from dist_llm_train.simulation import available_topologies, load_topology, parse_topology, resolve_topology

ISSUE_EXAMPLE = """
workers:
  - {name: us-east, bandwidth_mbps: 1000, latency_ms: 50}
  - {name: eu-west, bandwidth_mbps: 500, latency_ms: 150}
  - {name: asia-pacific, bandwidth_mbps: 100, latency_ms: 300}
  - {name: edge-device, bandwidth_mbps: 10, latency_ms: 500, count: 4}
"""


def test_issue_example_expands_to_seven_workers(tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(ISSUE_EXAMPLE)
    topo = load_topology(path)
    profiles = topo.profiles()
    assert topo.name == "example" and topo.n_workers == 7 and len(profiles) == 7
    assert [p.name for p in profiles] == [
        "us-east", "eu-west", "asia-pacific", "edge-device-0", "edge-device-1", "edge-device-2", "edge-device-3"
    ]  # fmt: skip
    edge = profiles[-1]
    assert edge.up_bps == edge.down_bps == 10e6 and edge.latency_s == pytest.approx(0.5)
    assert edge.rto_s == pytest.approx(1.0)  # max(200 ms, 2 x latency + 4 x jitter)
    assert not any(p.byzantine for p in profiles) and all(p.speed == 1.0 for p in profiles)


def test_presets_load_and_multi_region_is_the_issue_example() -> None:
    assert {"lan", "hetero-3tier", "multi-region"} <= set(available_topologies())
    lan = load_topology("lan")
    assert lan.n_workers == 4 and lan.profiles()[0].up_bps == 10e9
    hetero = load_topology("hetero-3tier")
    assert sorted({p.speed for p in hetero.profiles()}) == [0.25, 0.5, 2.0]
    region = load_topology("multi-region")
    example = parse_topology(yaml.safe_load(ISSUE_EXAMPLE))
    strip = [(p.name, p.up_bps, p.down_bps, p.latency_s) for p in region.profiles()]
    assert strip == [(p.name, p.up_bps, p.down_bps, p.latency_s) for p in example.profiles()]


def test_optional_fields_asymmetric_links_roles_and_crashes() -> None:
    topo = parse_topology(
        {
            "name": "t",
            "workers": [
                {"name": "home", "bandwidth_mbps": 100, "up_mbps": 10, "jitter_ms": 5, "loss": 0.01,
                 "speed": 0.5, "speed_jitter": 0.1, "crash": [{"at_s": 10, "down_s": 5}, {"at_s": 30}]},
                {"name": "evil", "up_mbps": 50, "down_mbps": 200, "role": "byzantine", "attack": "alie",
                 "attack_params": {"z": 1.0}},
            ],
        }
    )  # fmt: skip
    home, evil = topo.profiles()
    assert (home.up_bps, home.down_bps, home.jitter_s, home.loss) == (10e6, 100e6, 0.005, 0.01)
    assert home.crashes == ((10.0, 5.0), (30.0, None)) and home.speed == 0.5
    assert evil.byzantine and evil.attack == "alie" and evil.attack_params == {"z": 1.0}
    assert evil.link_mbps == 50.0
    slow = topo.with_bandwidth(10)
    assert all(p.up_bps == p.down_bps == 10e6 for p in slow.profiles())


@pytest.mark.parametrize(
    ("workers", "match"),
    [
        ([{"name": "a", "bandwidth_mbps": 1, "latency": 3}], "unknown key 'workers.0.latency'"),
        ([{"name": "a", "bandwidth_mbps": -1}], "workers.0.bandwidth_mbps=-1"),
        ([{"name": "a"}], "needs bandwidth_mbps"),
        ([{"name": "a", "bandwidth_mbps": 1, "role": "byzantine"}], "no attack"),
        ([{"name": "a", "bandwidth_mbps": 1, "loss": 0.95}], "workers.0.loss"),
        ([{"name": "a", "bandwidth_mbps": 1, "crash": [{"at_s": 5, "down_s": 10}, {"at_s": 12}]}], "overlap"),
        ([{"name": "a", "bandwidth_mbps": 1, "count": 2}, {"name": "a-1", "bandwidth_mbps": 1}], "twice"),
        ([], "workers"),
    ],
)
def test_bad_topologies_name_the_field(workers: list[dict], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_topology({"workers": workers})


def test_bad_files_and_unknown_presets(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("workers: [ {name: a\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_topology(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_topology(listing)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_topology("no-such-topology")


def test_cluster_config_and_topology_must_agree() -> None:
    assert resolve_topology(load_config(None, ["cluster.workers=3"]), None).n_workers == 3
    speeds = resolve_topology(load_config(None, ["cluster.workers=2", "cluster.speeds=[2, 0.5]"]), None)
    assert [p.speed for p in speeds.profiles()] == [2.0, 0.5]
    with pytest.raises(ConfigError, match=r"cluster\.workers=5 but topology"):
        resolve_topology(load_config(None, ["cluster.workers=5"]), "lan")
    with pytest.raises(ConfigError, match=r"needs cluster\.attack"):
        resolve_topology(load_config(None, ["cluster.byzantine=1"]), "lan")
    with pytest.raises(ConfigError, match="every relative speed"):
        resolve_topology(load_config(None, ["cluster.workers=2", "cluster.speeds=[1, 0]"]), None)
    via_config = resolve_topology(load_config(None, ["cluster.topology=multi-region"]), None)
    assert via_config.n_workers == 7
