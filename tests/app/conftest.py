from pathlib import Path

import pytest

from app.settings import Settings


@pytest.fixture
def moe_path(fixtures_dir) -> Path:
    return fixtures_dir / "llama-moe" / "Q4_K_M.gguf"


@pytest.fixture
def bridge(qtbot):
    from app.bridge import Bridge
    bridge = Bridge()
    bridge.start()
    yield bridge
    assert bridge.shutdown(), "the engine thread did not stop"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(tmp_path / "config" / "settings.json", tmp_path / "state" / "state.json")


@pytest.fixture
def loaded_moe(moe_path):
    from app.engine_jobs import LoadedModel
    from engine.gguf.model_file import ModelFile
    from engine.plan.inventory import Inventory
    model_file = ModelFile(moe_path)
    return LoadedModel(moe_path, model_file, Inventory.from_model_file(model_file), 0.0)
