import json

import pytest

from app import settings as settings_module
from app.settings import MAX_RECENT_FILES, Settings


@pytest.fixture
def app_dirs(monkeypatch, tmp_path):
    """platformdirs pointed at a temporary home for this test."""
    monkeypatch.setattr(settings_module, "user_config_dir", lambda app: str(tmp_path / "config" / app))
    monkeypatch.setattr(settings_module, "user_state_dir", lambda app: str(tmp_path / "state" / app))
    return tmp_path


def test_recent_files_persist_across_instances(app_dirs, tmp_path):
    first = Settings.load()
    assert first.recent_files == []
    first.add_recent_file(tmp_path / "a.gguf")
    first.add_recent_file(tmp_path / "b.gguf")
    first.add_recent_file(tmp_path / "a.gguf")     # reopening moves it to the top, once
    first.add_model_folder(tmp_path / "models")
    first.save()

    second = Settings.load()
    assert second.recent_files == [str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")]
    assert second.model_folders == [str(tmp_path / "models")]
    assert second.state_path == app_dirs / "state" / "offload-studio" / "state.json"
    assert json.loads(second.settings_path.read_text()) == {"model_folders": [str(tmp_path / "models")]}


def test_recent_files_are_capped(app_dirs, tmp_path):
    s = Settings.load()
    for i in range(MAX_RECENT_FILES + 5):
        s.add_recent_file(tmp_path / f"{i}.gguf")
    assert len(s.recent_files) == MAX_RECENT_FILES
    assert s.recent_files[0] == str(tmp_path / f"{MAX_RECENT_FILES + 4}.gguf")
    s.remove_recent_file(s.recent_files[0])
    assert len(s.recent_files) == MAX_RECENT_FILES - 1
    s.clear_recent_files()
    assert s.recent_files == []


def test_adding_a_folder_twice_keeps_one(app_dirs, tmp_path):
    s = Settings.load()
    assert s.add_model_folder(tmp_path / "m") is True
    assert s.add_model_folder(str(tmp_path / "m") + "/") is False
    s.remove_model_folder(str(tmp_path / "m"))
    assert s.model_folders == []


def test_an_unreadable_file_gives_defaults_and_is_kept_aside(app_dirs):
    state_path = Settings.load().state_path
    state_path.parent.mkdir(parents=True)
    state_path.write_text("{not json")
    s = Settings.load()
    assert s.recent_files == []
    assert state_path.with_name("state.json.bad").read_text() == "{not json"


def test_mistyped_values_fall_back_to_defaults(app_dirs):
    s = Settings.load()
    s.state_path.parent.mkdir(parents=True)
    s.state_path.write_text(json.dumps({"recent_files": "oops", "current_panel": "Chat", "unknown": 1}))
    s = Settings.load()
    assert s.recent_files == []
    assert s.state.current_panel == "Chat"


def test_save_is_atomic_and_leaves_no_temporary_files(app_dirs):
    s = Settings.load()
    s.state.current_panel = "Inspector"
    s.save()
    s.save()
    assert sorted(p.name for p in s.state_path.parent.iterdir()) == ["state.json"]
    assert json.loads(s.state_path.read_text())["current_panel"] == "Inspector"


HOSTILE_STATE = [
    "[" * 100_000 + "]" * 100_000,                              # nested deeper than the parser recurses
    json.dumps({"recent_files": [{"nested": {"settings": [1]}}]}),
    json.dumps({"recent_files": ["/models/" + "x" * 300 + ".gguf"]}),    # a part longer than 255 bytes
    json.dumps({"recent_files": ["/models/a\0b.gguf"]}),
    json.dumps([1, 2, 3]),
    "\xff\xfe not utf-8",
]


@pytest.mark.parametrize("text", HOSTILE_STATE)
def test_a_hostile_state_file_is_set_aside_and_reported_once(app_dirs, text):
    s = Settings.load()
    s.state_path.parent.mkdir(parents=True)
    s.state_path.write_bytes(text.encode("utf-8", "surrogateescape") if text.startswith("\xff") else text.encode())
    s = Settings.load()
    assert s.recent_files == []
    problems = s.take_problems()
    assert len(problems) == 1 and "state.json.bad" in problems[0] and "\n" not in problems[0]
    assert s.take_problems() == []
    assert s.state_path.with_name("state.json.bad").exists() and not s.state_path.exists()


def test_a_second_bad_file_does_not_overwrite_the_first(app_dirs):
    s = Settings.load()
    s.settings_path.parent.mkdir(parents=True)
    for text in ("{first", "{second"):
        s.settings_path.write_text(text)
        Settings.load()
    assert s.settings_path.with_name("settings.json.bad").read_text() == "{first"
    assert s.settings_path.with_name("settings.json.bad.1").read_text() == "{second"
