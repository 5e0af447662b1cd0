import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import app.conversations as conversations
from app.conversations import (TEMP_PREFIX, BackgroundWriter, Conversation, ConversationError, Message,
                               title_from_text, write_atomic)


def make_conversation(title: str = "Chat", n_turns: int = 2, updated_s: float = 1000.0) -> Conversation:
    conversation = Conversation(title=title, system_prompt="Be brief.", updated_s=updated_s, created_s=updated_s)
    for i in range(n_turns):
        conversation.messages.append(Message("user", f"question {i} — with ünïcode"))
        conversation.messages.append(Message("assistant", f"answer {i}\nsecond line",
                                             {"generation_tokens": 12 + i, "generation_tps": 41.5,
                                              "finish_reason": "stop"}))
    return conversation


def test_a_saved_conversation_loads_back_equal(store):
    conversation = make_conversation()
    conversation.messages[-1].error = "the context is full"
    path = store.save(conversation)
    assert path == store.directory / f"{conversation.id}.json"
    loaded = store.load(conversation.id)
    assert loaded == conversation
    assert loaded.messages[1].stats["generation_tokens"] == 12
    assert loaded.messages[-1].error == "the context is full"
    assert json.loads(path.read_text(encoding="utf-8"))["messages"][0]["content"] == "question 0 — with ünïcode"


def test_chat_messages_put_the_system_prompt_first_only_when_set():
    conversation = make_conversation(n_turns=1)
    assert conversation.chat_messages() == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "question 0 — with ünïcode"},
                                            {"role": "assistant", "content": "answer 0\nsecond line"}]
    conversation.system_prompt = "   "
    assert [m["role"] for m in conversation.chat_messages()] == ["user", "assistant"]


def test_list_is_newest_first_and_skips_broken_and_temporary_files(store):
    old, new = make_conversation("old", updated_s=100.0), make_conversation("new", n_turns=1, updated_s=200.0)
    store.save(old)
    store.save(new)
    (store.directory / f"{'0' * 32}.json").write_text("{not json", encoding="utf-8")
    (store.directory / f"{TEMP_PREFIX}abc.json").write_text("{}", encoding="utf-8")
    (store.directory / "notes.json").write_text("{}", encoding="utf-8")
    summaries = store.list()
    assert [s.title for s in summaries] == ["new", "old"]
    assert [s.n_messages for s in summaries] == [2, 4]
    assert summaries[0].updated_s == 200.0


def test_rename_and_delete(store):
    conversation = make_conversation()
    store.save(conversation)
    renamed = store.rename(conversation.id, "  Better title ")
    assert renamed.title == "Better title" and renamed.titled_by_user
    assert store.load(conversation.id).title == "Better title"
    assert store.delete(conversation.id) is True
    assert store.delete(conversation.id) is False
    assert store.list() == []
    with pytest.raises(ConversationError, match="no conversation"):
        store.load(conversation.id)


def test_ids_cannot_reach_outside_the_folder(store):
    with pytest.raises(ConversationError):
        store.path_of("../../etc/passwd")
    with pytest.raises(ConversationError):
        store.load("ABC")


def test_a_file_from_elsewhere_is_refused(store):
    store.directory.mkdir(parents=True)
    conversation = make_conversation()
    data = conversation.to_dict()
    data["format"] = "something-else"
    store.path_of(conversation.id).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConversationError, match="not an Offload Studio conversation"):
        store.load(conversation.id)


def test_save_fsyncs_the_data_before_the_rename(store, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(conversations.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(conversations.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    store.save(make_conversation())
    assert calls[:2] == ["fsync", "replace"]
    assert calls.count("fsync") == 2        # the file, then the folder that holds the new name


def test_a_failure_between_the_temporary_write_and_the_rename_keeps_the_old_file(store, monkeypatch):
    conversation = make_conversation("first version")
    store.save(conversation)
    before = store.path_of(conversation.id).read_bytes()
    written = {}

    def crash(temp_name, path):
        written["temp"] = Path(temp_name).read_text(encoding="utf-8")    # complete and flushed by now
        raise OSError("simulated crash")

    monkeypatch.setattr(conversations.os, "replace", crash)
    conversation.title = "second version"
    conversation.messages.append(Message("user", "one more"))
    with pytest.raises(OSError, match="simulated crash"):
        store.save(conversation)
    assert json.loads(written["temp"])["title"] == "second version"
    assert store.path_of(conversation.id).read_bytes() == before
    assert store.load(conversation.id).title == "first version"
    assert not list(store.directory.glob(f"{TEMP_PREFIX}*"))      # the failed attempt cleaned up after itself


def test_a_process_killed_before_the_rename_leaves_the_old_conversation_intact(store):
    conversation = make_conversation("survivor")
    store.save(conversation)
    before = store.path_of(conversation.id).read_bytes()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import app.conversations as c
        os.replace = lambda *args: os._exit(3)          # the process dies between write and rename
        store = c.ConversationStore({str(store.directory)!r})
        conversation = store.load({conversation.id!r})
        conversation.title = "lost"
        store.save(conversation)
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert completed.returncode == 3, completed.stderr.decode()
    assert store.path_of(conversation.id).read_bytes() == before
    leftovers = list(store.directory.glob(f"{TEMP_PREFIX}*"))
    assert len(leftovers) == 1 and json.loads(leftovers[0].read_text(encoding="utf-8"))["title"] == "lost"
    assert [s.title for s in store.list()] == ["survivor"]
    assert store.remove_stale_temps(max_age_s=3600) == 0      # too young: it might be a save in progress
    assert store.remove_stale_temps(max_age_s=-1) == 1
    assert not list(store.directory.glob(f"{TEMP_PREFIX}*"))


def test_write_atomic_creates_the_folder(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    write_atomic(path, b"{}")
    assert path.read_bytes() == b"{}"


@pytest.mark.parametrize("text, title", [
    ("  Hello there\nsecond line", "Hello there"),
    ("", "New chat"),
    ("word " * 30, "word word word word word word word word word…"),
    ("x" * 60, "x" * 47 + "…"),
])
def test_title_from_text(text, title):
    assert title_from_text(text) == title


def test_the_background_writer_keeps_order_reports_errors_and_flushes(store):
    errors, done = [], []
    writer = BackgroundWriter(on_error=errors.append)
    conversation = make_conversation("v1")
    writer.submit(lambda: store.save(conversation))
    renamed = Conversation.from_dict(conversation.to_dict())
    renamed.title = "v2"
    writer.submit(lambda: store.save(renamed))
    writer.submit(lambda: store.load("f" * 32))               # fails: reported, the writer goes on
    writer.submit(lambda: done.append(store.load(conversation.id).title))
    assert writer.flush(timeout_s=10)
    assert done == ["v2"]
    assert len(errors) == 1 and isinstance(errors[0], ConversationError)
    writer.close()
    future = writer.submit(lambda: store.delete(conversation.id))      # after close: runs at once
    assert future.result() is True and store.list() == []
    assert writer.flush()


HOSTILE_FIELDS = [
    {"created_s": "yesterday"}, {"version": "1"}, {"messages": [5]}, {"messages": [{"role": "user"}]},
    {"messages": "hello"}, {"title": ["x"]}, {"updated_s": float("nan")}, {"titled_by_user": "yes"},
    {"messages": [{"role": "user", "content": "hi", "stats": [1]}]}, {"id": ["a"]},
]


@pytest.mark.parametrize("change", HOSTILE_FIELDS, ids=lambda c: next(iter(c)))
def test_a_file_that_breaks_the_schema_is_set_aside_once(store, change):
    good, bad = make_conversation("good"), make_conversation("bad")
    store.save(good)
    path = store.save(bad)
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data, allow_nan=True))
    assert [s.id for s in store.list()] == [good.id]
    problems = store.take_problems()
    assert len(problems) == 1 and f"{bad.id}.json.bad" in problems[0]
    assert store.take_problems() == [] and [s.id for s in store.list()] == [good.id]
    assert path.with_name(path.name + ".bad").exists()


def test_deeply_nested_json_is_set_aside(store):
    conversation = make_conversation()
    path = store.save(conversation)
    path.write_text('{"format": "offload-studio-conversation", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert store.list() == []
    assert "nested too deeply" in store.take_problems()[0]


def test_set_aside_keeps_an_earlier_bad_file(store):
    conversation = make_conversation()
    path = store.save(conversation)
    for text in ("{one", "{two"):
        path.write_text(text)
        store.list()
    assert path.with_name(path.name + ".bad").read_text() == "{one"
    assert path.with_name(path.name + ".bad.1").read_text() == "{two"
