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


@pytest.fixture(autouse=True, scope="session")
def _no_user_tuning(tmp_path_factory):
    # A tuning file in the developer's home (python -m mlx_gdn.tune) would change what
    # algorithm="auto" picks; tests see an empty one unless they write their own.
    import os

    from mlx_gdn import tuning

    os.environ["MLX_GDN_CACHE"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")
    tuning.reload()
    yield
