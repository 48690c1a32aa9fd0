"""The controller's allocator settings (glibc's mmap and trim thresholds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_llm_train.runtime import allocator


def _in_fresh_process(env: dict[str, str]) -> str:
    code = "from dist_llm_train.runtime.allocator import retain_freed_buffers; print(retain_freed_buffers())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_thresholds_are_set_on_glibc() -> None:
    # The CI machines and the ones the results were measured on run glibc: mallopt must accept both.
    assert _in_fresh_process({"PATH": "/usr/bin:/bin"}) == "True"


@pytest.mark.parametrize("variable", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_threshold_set_in_the_environment_is_left_alone(variable: str) -> None:
    assert _in_fresh_process({"PATH": "/usr/bin:/bin", variable: "1048576"}) == "False"


def test_no_c_library_means_nothing_is_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.retain_freed_buffers() is False
