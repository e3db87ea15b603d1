from tests.fleet.conftest import client, rds, redis_url, reference  # noqa: F401
