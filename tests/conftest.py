"""Every test starts from the ops settings of the process environment: the ops layer reads its
environment variables once (curkernels/ops/settings.py), so a test that sets one reloads the
settings itself, and they are reloaded after it, once its monkeypatched variables are undone."""

import pytest

from curkernels.ops import settings


@pytest.fixture(autouse=True)
def _ops_settings_follow_the_environment():
    yield
    settings.reload()
