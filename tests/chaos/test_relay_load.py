"""Relay load, short form (CI): 200 websocket clients open at once on one relay process, every
chunk once and in order, the relay's memory bounded. ``python -m tests.chaos.run --full`` runs 1,000."""
from __future__ import annotations

import asyncio

from tests.chaos.relay_load import relay_load
from tests.chaos.run import RELAY_COLUMNS, failures, table

CLIENTS = 200


def test_relay_holds_many_streaming_clients(chaos_fleet):
    row = asyncio.run(relay_load(chaos_fleet, CLIENTS, max_tokens=64, timeout_s=120))
    print("\n" + table([row], RELAY_COLUMNS) + (f"\nerrors: {row['note']}" if row["note"] else ""))
    assert failures(row) == [], row
    assert row["completed"] == CLIENTS and row["client_errors"] == 0, row
    assert row["clients_peak_open"] == CLIENTS, "the clients were not held open at once"
    # what 200 more websockets cost the relay: no per-client Redis connection or unbounded buffer
    assert row["relay_rss_mb_peak"] - row["relay_rss_mb_idle"] < 64, row
    assert row["chunk_latency_ms_p50"] is not None
