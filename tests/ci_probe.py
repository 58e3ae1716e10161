"""Not collected by the suite (no ``test_`` prefix): run by tests/test_conftest_ci.py in a
subprocess, with the shared data moved away, to show what the conftest helpers do."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import need, need_tool


def test_needs_the_shared_data(shared_data: Path) -> None:
    assert need(shared_data, "chest-ct-philips-141").is_dir()


def test_needs_a_tool() -> None:
    need_tool("medseg-no-such-tool")
