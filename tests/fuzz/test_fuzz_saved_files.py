"""Hostile saved files (settings, window state, conversations): loading always succeeds with
defaults for what is unusable, each bad file is set aside once and reported in one line."""
import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import given

from app.conversations import ConversationStore
from app.settings import Settings
from fuzz_strategies import JSON_VALUES, OUTCOMES, bounded, fuzz_settings, saved_json_text

SETTINGS_KEYS = ["model_folders"]
STATE_KEYS = ["recent_files", "window_geometry", "window_state", "current_panel"]
CONVERSATION_KEYS = ["format", "version", "id", "title", "titled_by_user", "created_s", "updated_s", "system_prompt",
                     "messages"]


ROOT = Path(tempfile.mkdtemp(prefix="offload-fuzz-saved-"))


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(dir=ROOT))


def teardown_module(module):
    shutil.rmtree(ROOT, ignore_errors=True)
    stats = os.environ.get("FUZZ_STATS")
    if stats:       # the counts of every fuzz module so far (they share OUTCOMES)
        Path(stats).write_text(json.dumps({f"{p}:{o}": n for (p, o), n in sorted(OUTCOMES.items())}, indent=1))


@fuzz_settings(40)
@given(settings_text=saved_json_text(SETTINGS_KEYS), state_text=saved_json_text(STATE_KEYS))
def test_settings_and_state_files(settings_text, state_text):
    folder = fresh_dir()
    (folder / "settings.json").write_text(settings_text, encoding="utf-8", errors="surrogatepass")
    (folder / "state.json").write_text(state_text, encoding="utf-8", errors="surrogatepass")
    with bounded("settings"):
        settings = Settings(folder / "settings.json", folder / "state.json")
        problems = settings.take_problems()
        assert all("\n" not in p for p in problems) and settings.take_problems() == []
        for path in settings.recent_files + settings.model_folders:
            Path(path).exists()         # every kept path can be asked about
        settings.add_recent_file(folder / "m.gguf")
        settings.save()
        assert Settings(folder / "settings.json", folder / "state.json").take_problems() == []


@fuzz_settings(40)
@given(text=saved_json_text(CONVERSATION_KEYS), messages=JSON_VALUES)
def test_conversation_files(text, messages):
    store = ConversationStore(fresh_dir())
    path = store.directory / ("0" * 32 + ".json")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    second = store.directory / ("1" * 32 + ".json")
    second.write_text(json.dumps({"format": "offload-studio-conversation", "id": "1" * 32, "messages": messages}))
    with bounded("conversations"):
        summaries = store.list()
        problems = store.take_problems()
        assert len(summaries) + len(problems) == 2 and all("\n" not in p for p in problems)
        assert store.list() == summaries and store.take_problems() == []     # told once, then set aside
        for summary in summaries:
            store.load(summary.id).chat_messages()
