"""`offload-studio screenshots` renders every panel, with a real chat turn, in a temporary
profile: the user's saved conversations and remembered plans are neither shown nor changed."""
from pathlib import Path

import pytest


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_dirs(tmp_path, monkeypatch):
    """The user's own data and config folders (platformdirs reads XDG_* on Linux), with a saved conversation."""
    from app.conversations import Conversation, ConversationStore, Message, default_conversations_dir
    from app.designer_state import default_state_dir
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user-config"))
    conversation = Conversation(title="My private chat")
    conversation.messages = [Message("user", "my own question"), Message("assistant", "an answer")]
    ConversationStore().save(conversation)
    default_state_dir().mkdir(parents=True)
    (default_state_dir() / "my-model.gguf-1.json").write_text("{}")
    assert default_conversations_dir().is_relative_to(tmp_path)
    return [tmp_path / "user-data", tmp_path / "user-config"]


def test_screenshots_leave_the_users_data_alone(qtbot, user_dirs, fixtures_dir, tmp_path):
    from app.conversations import ConversationStore, default_conversations_dir
    from app.designer_state import default_state_dir
    from app.screenshots import render_screenshots
    before = [snapshot(d) for d in user_dirs]
    model = fixtures_dir / "llama-moe" / "Q4_K_M.gguf"
    saved = render_screenshots(tmp_path / "out", model, "24GiB", run_model=model)
    assert [p.name for p in saved] == ["01-designer.png", "04-inspector.png", "02-chat.png", "03-perplexity.png"]
    assert all(p.stat().st_size > 10_000 for p in saved)
    assert [snapshot(d) for d in user_dirs] == before
    assert [s.title for s in ConversationStore().list()] == ["My private chat"]
    # the folders are the user's again after the run
    assert default_conversations_dir().is_relative_to(tmp_path / "user-data")
    assert default_state_dir().is_relative_to(tmp_path / "user-config")
