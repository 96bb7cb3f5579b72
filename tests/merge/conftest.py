from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.merge import adapters


def base_for(request: pytest.FixtureRequest, name: str) -> Path:
    return request.getfixturevalue(adapters.BASES.get(name, adapters.UNTIED_F32))


@pytest.fixture(scope="session")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each named adapter of adapters.ALL_SPECS, built once per session on its base."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = adapters.build_adapter(base_for(request, name), tmp_path_factory.mktemp(name), adapters.ALL_SPECS[name])
        return cache[name]

    return get
