"""Shared test setup."""

import pytest

from mlx_gdn import backends


@pytest.fixture(autouse=True)
def _fresh_plans():
    # Tests replace backend modules and crossover entries; a plan remembered by an earlier
    # test must not answer for them.
    backends.clear_plans()
    yield
    backends.clear_plans()
