"""tools/soak's own bookkeeping (the soak itself runs in tests/integration/test_soak.py)."""

from __future__ import annotations

import importlib.util
import os
import types

from support.helpers import ROOT


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_tool",
                                                  os.path.join(ROOT, "tools", "soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_killing_a_fio_job_that_just_exited_is_not_a_failure():
    """A fio job that exited but is not reaped yet has returncode None and its kill()
    raises ProcessLookupError; that ended a 30-minute soak of two pairs as FAIL."""
    soak = _soak_module()
    killed = []

    def gone():
        killed.append(True)
        raise ProcessLookupError()

    me = types.SimpleNamespace(fio_proc=types.SimpleNamespace(returncode=None, kill=gone))
    soak.Soak.kill_fio(me)  # no exception
    assert killed
    me.fio_proc = None
    soak.Soak.kill_fio(me)
