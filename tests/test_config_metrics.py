"""blockrep.config: the `metrics` key (docs/metrics.md): off by default, [resource] for both
nodes, [node.X] overriding it, and addresses that could not all be bound refused."""

from __future__ import annotations

import copy

import pytest

from blockrep.config import ConfigError, parse


def base() -> dict:
    return {
        "resource": {"name": "r0", "shared-secret": "s3cret"},
        "node": {
            "alpha": {"address": "10.0.0.1:7789", "disk": "/dev/vdb", "nbd": "10.0.0.1:10809"},
            "beta": {"address": "10.0.0.2:7789", "disk": "/dev/vdc", "nbd": "10.0.0.2:10809"},
        },
    }


def cfg_with(resource=None, **nodes):
    raw = copy.deepcopy(base())
    raw["resource"].update(resource or {})
    for n, keys in nodes.items():
        raw["node"][n].update(keys)
    return parse(raw, "r0.toml")


def refused(*fragments, resource=None, **nodes):
    with pytest.raises(ConfigError) as ei:
        cfg_with(resource, **nodes)
    for f in fragments:
        assert f in str(ei.value), (f, str(ei.value))


def test_metrics_off_by_default():
    cfg = cfg_with()
    assert cfg.nodes["alpha"].metrics is None and cfg.nodes["beta"].metrics is None


def test_metrics_in_resource_for_both_nodes_and_per_node_override():
    cfg = cfg_with({"metrics": "127.0.0.1:9942"})
    assert cfg.nodes["alpha"].metrics == cfg.nodes["beta"].metrics == ("127.0.0.1", 9942)
    cfg = cfg_with({"metrics": "127.0.0.1:9942"}, beta={"metrics": "0.0.0.0:9943"})
    assert cfg.nodes["alpha"].metrics == ("127.0.0.1", 9942)
    assert cfg.nodes["beta"].metrics == ("0.0.0.0", 9943)
    cfg = cfg_with({"metrics": "127.0.0.1:9942"}, beta={"metrics": ""})  # off for beta
    assert cfg.nodes["beta"].metrics is None
    cfg = cfg_with({"metrics": "[::1]:9942"})
    assert cfg.nodes["alpha"].metrics == ("::1", 9942)


def test_bad_metrics_addresses_are_refused():
    refused("r0.toml: resource.metrics", "expected HOST:PORT", resource={"metrics": "9942"})
    refused("node.alpha.metrics", "port out of range", alpha={"metrics": "127.0.0.1:70000"})
    refused("node.alpha.metrics", "wrong type", alpha={"metrics": 9942})
    refused("node.alpha: metrics address 0.0.0.0:10809 clashes with its nbd address",
            alpha={"metrics": "0.0.0.0:10809"})
    refused("clashes with its replication address", alpha={"metrics": "10.0.0.1:7789"})


def test_both_nodes_on_one_host_need_their_own_metrics_port():
    loop = {"alpha": {"address": "127.0.0.1:7789", "nbd": "127.0.0.1:10809"},
            "beta": {"address": "127.0.0.1:7790", "nbd": "127.0.0.1:10810"}}
    refused("node.alpha (metrics 127.0.0.1:9942) and node.beta (metrics 127.0.0.1:9942) "
            "would listen on the same address on one host", resource={"metrics":
                                                                      "127.0.0.1:9942"},
            **loop)
    cfg = cfg_with(alpha={**loop["alpha"], "metrics": "127.0.0.1:9942"},
                   beta={**loop["beta"], "metrics": "127.0.0.1:9943"})
    assert cfg.nodes["beta"].metrics == ("127.0.0.1", 9943)
    # two machines: the same loopback or wildcard metrics address on each is fine
    assert cfg_with({"metrics": "0.0.0.0:9942"}).nodes["alpha"].metrics == ("0.0.0.0", 9942)
