"""Shared test setup."""

import pytest

from mlx_gdn import backends
from mlx_gdn.testing import drawn_seeds


@pytest.fixture(autouse=True)
def _fresh_plans():
    # Tests replace backend modules and crossover entries; a plan remembered by an earlier
    # test must not answer for them.
    backends.clear_plans()
    yield
    backends.clear_plans()


@pytest.fixture(autouse=True)
def _seeds():
    drawn_seeds(clear=True)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Every seed a failing test drew with fresh_seed() goes into its report, so any randomized
    # failure can be reproduced even where an assertion's own message leaves the seed out.
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when == "call":
        seeds = drawn_seeds()
        if seeds:
            rep.sections.append(("seeds drawn with mlx_gdn.testing.fresh_seed()", ", ".join(map(str, seeds))))


@pytest.fixture(autouse=True, scope="session")
def _no_user_tuning(tmp_path_factory):
    # A tuning file in the developer's home (python -m mlx_gdn.tune) would change what
    # algorithm="auto" picks; tests see an empty one unless they write their own.
    import os

    from mlx_gdn import tuning

    os.environ["MLX_GDN_CACHE"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")
    tuning.reload()
    yield
