"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def requires_mount() -> None:
    """Skip, saying why, unless this process can mount EROFS/composefs images."""
    from cfsdeploy.mounts import can_mount  # here, so other tests never depend on it importing

    ok, reason = can_mount()
    if not ok:
        pytest.skip(f"cannot mount images here: {reason}")
