"""The stale-core warning: a native source newer than the built core is named."""

from __future__ import annotations

import os
import time

from kvmpy import _core, corebuild


def test_a_current_core_gives_no_warning() -> None:
    built = os.stat(_core.__file__).st_mtime
    for p in corebuild.NATIVE_DIR.glob("*.[ch]"):
        if p.stat().st_mtime > built:  # a dirty tree while developing: nothing to assert
            return
    assert corebuild.warning() is None


def test_a_touched_source_is_named(monkeypatch) -> None:
    newest = time.time() + 3600
    real_stat = os.stat

    class _Stat:
        def __init__(self, st: os.stat_result, mtime: float) -> None:
            self._st, self.st_mtime = st, mtime

    def fake_stat(path, *a, **k):  # noqa: ANN001, ANN002, ANN003
        st = real_stat(path, *a, **k)
        if str(path).endswith("vcpu_loop.c"):
            return _Stat(st, newest)
        return st

    monkeypatch.setattr(corebuild.Path, "stat", lambda self, **k: fake_stat(self, **k))
    text = corebuild.warning()
    assert text is not None and "vcpu_loop.c" in text and "build_ext --inplace" in text
