"""Helpers for tests that put the fault toolkit (blockrep/faults) into a two-node Cluster:
rewrite one node's view of the configuration, route the link through the proxy, give a node a
faulty disk."""

from __future__ import annotations

import re

from blockrep.faults.disk import FaultyDisk
from blockrep.faults.proxy import ProxyThread


def set_node_value(c, config_of: str, node: str, key: str, value: str) -> None:
    """In `config_of`'s configuration file, set `key` of [node.NODE] to the string value."""
    path = c.configs[config_of]
    with open(path) as f:
        text = f.read()
    head, sep, tail = text.partition(f"[node.{node}]")
    assert sep, f"no [node.{node}] in {path}"
    tail, n = re.subn(rf'(?m)^{re.escape(key)} = ".*"$', f'{key} = "{value}"', tail, count=1)
    assert n == 1, f"no {key} under [node.{node}] in {path}"
    with open(path, "w") as f:
        f.write(head + sep + tail)


def route_through_proxy(c, **kw) -> ProxyThread:
    """alpha (the node that dials) reaches beta's link port through a proxy; beta keeps
    listening on its own port. Returns the running ProxyThread (close it, or use `with`)."""
    proxy = ProxyThread(("127.0.0.1", c.ports["beta"][0]), **kw)
    set_node_value(c, "alpha", "beta", "address", f"127.0.0.1:{proxy.port}")
    return proxy


def faulty_disk_for(c, node: str, **kw) -> FaultyDisk:
    """Serve `node`'s image through nbdkit's error filter (file plugin) and nbdfuse, and make
    the node use the nbdfuse file as its disk. The image keeps its bytes (metadata included),
    so Cluster.disk(node) still names the data. Returns the started FaultyDisk."""
    import os

    size = os.path.getsize(c.disk(node))
    fd = FaultyDisk(c.dir, size, backing=c.disk(node), name=f"{node}-faulty", **kw)
    fd.start()
    set_node_value(c, node, node, "disk", fd.path)
    return fd
