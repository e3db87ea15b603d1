"""Fixtures of the fault-injection suite: the whole fleet as real processes on loopback."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def chaos_fleet(tmp_path_factory):
    """Redis (AOF on), two workers on the tiny model with 50 adapters, the API and the relay
    (``tests.chaos.harness.Fleet``); scenarios may kill and restart any of them."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from tests.chaos.harness import Fleet
    from tests.chaos.relay_load import raise_open_files
    raise_open_files(4096)
    fleet = Fleet(tmp_path_factory.mktemp("chaos"), num_adapters=50, workers=2)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
