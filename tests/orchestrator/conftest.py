"""Fixtures of the orchestrator tests."""

from __future__ import annotations

import pytest
from semla_world import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:  # noqa: ANN001
    """The small SemLA world (built once per session; about a minute)."""
    return build_world(tmp_path_factory.mktemp("semla_world"))
