"""API fixtures: the fleet's real redis-server and worker processes, plus the API and the relay
served by a real uvicorn on free ports (in threads of the test process)."""
from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from tests.fleet.conftest import _free_port, client, rds, redis_url, reference, start_worker  # noqa: F401

KEYS = {"key-alice": "alice", "key-bob": "bob"}


class Served:
    """A uvicorn server in a thread; ``url`` is its base URL, ``ws`` the same for websockets."""

    def __init__(self, app, log_level: str = "warning"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level,
                                                    ws="websockets-sansio"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def fleet_worker(start_worker):
    return start_worker("api-w", preload=["ad0", "ad1", "ad2", "ad3"], max_num_seqs=8).wait_ready()


@pytest.fixture(scope="module")
def settings(redis_url, tiny):
    from producer.api import ApiSettings
    model_dir, adapters = tiny
    root = str(next(iter(adapters.values())).parent)
    return ApiSettings(redis_url=redis_url, api_keys=KEYS, model_dir=str(model_dir), model_name="tiny-base",
                       adapter_dirs=root, block_ms=100, request_timeout_s=60)


@pytest.fixture(scope="module")
def api(settings):
    from producer.api import create_app
    s = Served(create_app(settings))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def relay(settings):
    from producer.relay import create_relay_app
    s = Served(create_relay_app(settings))
    yield s
    s.stop()
