import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support.helpers import start_serve  # noqa: E402


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(size="64M", *extra_args) -> Served; every server is stopped after."""
    started = []

    def _start(size: str = "64M", *extra: str, disk: str | None = None, export: str = ""):
        path = disk or str(tmp_path / f"disk{len(started)}.img")
        srv = start_serve(path, str(tmp_path), *extra, size=None if disk else size,
                          export=export)
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        srv.stop()


@pytest.fixture
def cluster(tmp_path):
    """Factory: cluster(**kw) -> Cluster (tests/support/cluster.py); all nodes are stopped
    after."""
    from support.cluster import Cluster

    made = []

    def _make(tmp=None, **kw):
        """tmp: the cluster's directory (default: the test's tmp_path)."""
        if tmp is None:
            tmp = tmp_path / f"c{len(made)}" if made else tmp_path
        c = Cluster(tmp, **kw)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.stop_all()
