"""Fixtures for the server's in-process tests: one engine of every kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcli.server.engine.base import Engine
from tests.server.fakes import ENGINES, make_engine


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """Each engine in turn: the same test, the same assertions, against every implementation."""
    opened = make_engine(request.param, tmp_path)
    yield opened
    opened.close()
