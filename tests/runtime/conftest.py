"""Fixtures for runtime tests: a ZeroMQ context that is always torn down, and CurveZMQ key sets."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from dist_llm_train.runtime.security import generate_keys


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test stops the threads it starts (authenticators, helpers)."""
    before = set(threading.enumerate())
    yield
    # pyzmq's zero-copy garbage collector is one process-wide daemon, started on the first copy=False send.
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and type(t).__name__ != "GarbageCollectorThread"
    ]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture()
def zmq_context() -> Iterator[zmq.Context]:
    """A private context (ZAP handlers are per context); every socket left open is closed with linger 0."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@dataclass(frozen=True)
class KeySet:
    """Controller keys, three worker keys, and an allow-list holding workers 0 and 1 (not 2)."""

    keys_dir: Path
    allow_dir: Path

    def secret(self, name: str) -> Path:
        return self.keys_dir / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.keys_dir / f"{name}.key"


@pytest.fixture(scope="module")
def key_set(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    root = tmp_path_factory.mktemp("curve")
    keys_dir, allow_dir = root / "keys", root / "allow"
    allow_dir.mkdir()
    for name in ("controller", "worker-0", "worker-1", "worker-2"):
        public, _ = generate_keys(keys_dir, name)
        if name in ("worker-0", "worker-1"):
            shutil.copy(public, allow_dir)
    return KeySet(keys_dir, allow_dir)
