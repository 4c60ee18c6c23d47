"""Shared test setup."""

import pytest

from mlx_gdn import backends


@pytest.fixture(autouse=True)
def _fresh_routes():
    # Tests replace backend modules and crossover entries; a route remembered by an earlier
    # test must not answer for them.
    backends.clear_routes()
    yield
    backends.clear_routes()
