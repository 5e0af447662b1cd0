from pathlib import Path

import pytest

from app.settings import Settings
from chat_support import controller, dialogs, panel  # noqa: F401  (the chat fixtures; a module's own overrides)


@pytest.fixture
def moe_path(fixtures_dir) -> Path:
    return fixtures_dir / "llama-moe" / "Q4_K_M.gguf"


@pytest.fixture(autouse=True)
def kernels_warm(monkeypatch):
    """The kernel cache counts as warm: the window's warm-up on open would otherwise compile in the
    background of tests that never run a model, and a Numba compile cannot stop at teardown.
    Tests of the warm-up itself say otherwise."""
    monkeypatch.setattr("engine.run.warmup.is_warm", lambda model_file, run_config: True)


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


@pytest.fixture(scope="module")
def loaded(fixtures_dir):
    """The llama-moe Q4_K_M fixture as the app holds an open model."""
    from app.engine_jobs import LoadedModel
    from engine.gguf.model_file import ModelFile
    from engine.plan.inventory import Inventory
    path = fixtures_dir / "llama-moe" / "Q4_K_M.gguf"
    model_file = ModelFile(path)
    return LoadedModel(path, model_file, Inventory.from_model_file(model_file), 0.0)


@pytest.fixture
def store(tmp_path):
    from app.conversations import ConversationStore
    return ConversationStore(tmp_path / "conversations")
