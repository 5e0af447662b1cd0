from gguf.constants import Keys
from PySide6.QtCore import Qt

from app.engine_jobs import LoadedModel
from app.conversations import ConversationSummary, Message
from app.models.chat import (ConversationIdRole, ConversationListModel, ErrorRole, MessageListModel, SpeakerRole,
                             StatsRole, StreamingRole, format_stats)
from app.widgets.chat import ChatPanel
from engine.run_config import RunConfig
from chat_support import TURN_TIMEOUT_MS, finish_turn
from slow_model import factory



# ---- fixtures ---------------------------------------------------------------------------------

def roles(panel) -> list[str]:
    return [m.role for m in panel.messages.messages()]


# ---- the models -------------------------------------------------------------------------------

def sample_messages() -> list[Message]:
    return [Message("user", "Hi"),
            Message("assistant", "Hello!", {"generation_tokens": 3, "generation_tps": 20.0, "prompt_tokens": 9,
                                            "prompt_tps": 400.0, "finish_reason": "stop"}),
            Message("user", "More"),
            Message("assistant", "Well", {"generation_tokens": 1, "finish_reason": "cancelled"}, error="")]


def test_message_model_passes_the_model_tester(qtmodeltester):
    qtmodeltester.check(MessageListModel(sample_messages()))


def test_message_model_data(qtbot):
    model = MessageListModel(sample_messages())
    assert model.rowCount() == 4
    index = model.index(1)
    assert index.data() == "Hello!"
    assert index.data(SpeakerRole) == "assistant"
    assert index.data(StatsRole) == "3 tokens  ·  20.0 tok/s  ·  prompt 9 tokens at 400 tok/s"
    assert model.index(3).data(StatsRole) == "1 token  ·  stopped"
    assert model.index(0).data(StatsRole) == ""
    assert index.data(StreamingRole) is False


def test_streaming_text_changes_one_row_only(qtbot):
    model = MessageListModel(sample_messages()[:2])
    row = model.append_message(Message("assistant", ""), streaming=True)
    assert row == 2 and model.index(2).data(StreamingRole) is True
    changes = []
    model.dataChanged.connect(lambda top, bottom, _roles: changes.append((top.row(), bottom.row())))
    model.append_text(row, "Hel")
    model.append_text(row, "lo")
    model.append_text(row, "")
    assert changes == [(2, 2), (2, 2)]
    model.finish_streaming({"generation_tokens": 2, "finish_reason": "length"}, error="context full")
    assert model.index(2).data() == "Hello"
    assert model.index(2).data(StreamingRole) is False
    assert model.index(2).data(StatsRole) == "2 tokens  ·  stopped at the token limit"
    assert model.index(2).data(ErrorRole) == "context full"
    model.truncate(1)
    assert [m.content for m in model.messages()] == ["Hi"]


def test_conversation_list_model(qtmodeltester):
    model = ConversationListModel([ConversationSummary("a" * 32, "old", 1.0, 2),
                                   ConversationSummary("b" * 32, "new", 5.0, 4)])
    qtmodeltester.check(model)
    assert [model.index(r).data() for r in range(2)] == ["new", "old"]
    assert model.index(1).data(ConversationIdRole) == "a" * 32
    assert model.upsert(ConversationSummary("a" * 32, "old, updated", 9.0, 3)) == 0
    assert [model.index(r).data() for r in range(2)] == ["old, updated", "new"]
    assert model.upsert(ConversationSummary("c" * 32, "middle", 7.0, 1)) == 1
    assert [model.summary_at(r).title for r in range(3)] == ["old, updated", "middle", "new"]
    edited = []
    model.title_edited.connect(lambda cid, title: edited.append((cid, title)))
    assert model.setData(model.index(2), "  renamed  ")
    assert edited == [("b" * 32, "renamed")]
    assert not model.setData(model.index(2), "   ")
    assert model.remove("c" * 32) and model.rowCount() == 2
    qtmodeltester.check(model)


def test_format_stats_says_nothing_for_an_empty_turn():
    assert format_stats({}) == ""
    assert format_stats({"finish_reason": "stop"}) == ""


# ---- the panel on a real model -----------------------------------------------------------------

def test_a_reply_streams_into_the_view_with_live_stats(qtbot, panel):
    panel.runner.model_factory = factory(delay_s=0.01)
    panel.sampling.max_tokens.setValue(30)
    lengths = []
    panel.messages.dataChanged.connect(
        lambda top, _bottom, _roles: lengths.append(len(panel.messages.message(top.row()).content)))
    reason = finish_turn(qtbot, panel, lambda: panel.send("Hello there"))
    assert reason == "length"
    assert roles(panel) == ["user", "assistant"]
    reply = panel.messages.message(1)
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3, "the reply should arrive in several pieces"
    assert growing == sorted(growing) and growing[-1] == len(reply.content)
    stats = reply.stats
    assert stats["generation_tokens"] == 30
    assert stats["context_used"] == stats["prompt_tokens"] + 30 - 1     # the last token is never evaluated
    assert stats["generation_tps"] > 0 and stats["prompt_tps"] > 0
    assert panel.stats.context_label.text() == f"Context  <b>{stats['context_used']}</b> / 4,096"
    assert panel.stats.context_bar.maximum() == 4096 and panel.stats.context_bar.value() == stats["context_used"]
    assert "tok/s" in panel.stats.generation_label.text()
    assert not panel.is_generating and panel.send_button.isVisible() and not panel.stop_button.isVisible()


def test_stop_cancels_mid_generation_and_keeps_the_partial_reply(qtbot, panel):
    panel.runner.model_factory = factory(delay_s=0.03)
    panel.sampling.max_tokens.setValue(100_000)
    assert panel.send("Tell me a long story")
    handle = panel.controller.job
    assert panel.stop_button.isVisible() and not panel.regenerate_button.isEnabled()
    qtbot.waitUntil(lambda: len(panel.messages.message(1).content) > 0, timeout=TURN_TIMEOUT_MS)
    with qtbot.waitSignals([handle.cancelled, panel.turn_finished], timeout=10_000):
        qtbot.mouseClick(panel.stop_button, Qt.LeftButton)
    partial = panel.messages.message(1)
    assert partial.content and partial.stats["finish_reason"] == "cancelled"
    assert 0 < partial.stats["generation_tokens"] < 100_000
    assert not panel.is_generating and panel.send_button.isVisible()
    # the panel (and the engine's session) is usable again
    panel.sampling.max_tokens.setValue(3)
    assert finish_turn(qtbot, panel, lambda: panel.send("And then?")) == "length"
    assert roles(panel) == ["user", "assistant", "user", "assistant"]
    assert panel.messages.message(3).stats["generation_tokens"] == 3


def test_regenerate_replaces_the_reply_and_reuses_the_cached_prompt(qtbot, panel):
    panel.sampling.max_tokens.setValue(12)
    panel.sampling.temperature.setValue(0.0)        # greedy: the reply depends on the logits alone
    finish_turn(qtbot, panel, lambda: panel.send("Name three colours"))
    first = panel.messages.message(1).content
    first_prompt = panel.last_turn
    assert first and first_prompt.reused_tokens == 0
    finish_turn(qtbot, panel, panel.regenerate)      # the same reply, though only the last prompt token is new
    assert roles(panel) == ["user", "assistant"]
    assert panel.messages.message(1).content == first
    assert panel.last_turn.prompt_tokens == first_prompt.prompt_tokens
    assert panel.last_turn.reused_tokens == first_prompt.prompt_tokens - 1
    panel.sampling.temperature.setValue(1.0)
    panel.sampling.seed.setValue(8)
    finish_turn(qtbot, panel, panel.regenerate)
    assert roles(panel) == ["user", "assistant"]
    assert panel.messages.message(1).content != first


def test_edit_and_resend_truncates_the_conversation_there(qtbot, panel, store):
    finish_turn(qtbot, panel, lambda: panel.send("First question"))
    finish_turn(qtbot, panel, lambda: panel.send("Second question"))
    assert roles(panel) == ["user", "assistant", "user", "assistant"]
    second_turn_prompt = panel.last_turn.prompt_tokens
    assert panel.begin_edit(0)
    assert panel.input.toPlainText() == "First question" and panel.edit_banner.isVisibleTo(panel)
    assert panel.send_button.text() == "Resend"
    panel.input.setPlainText("A better first question")
    with qtbot.waitSignal(panel.turn_finished, timeout=TURN_TIMEOUT_MS):
        qtbot.keyClick(panel.input, Qt.Key_Return)
    assert roles(panel) == ["user", "assistant"]
    assert panel.messages.message(0).content == "A better first question"
    assert panel.messages.message(1).content
    assert panel.last_turn.prompt_tokens < second_turn_prompt
    assert not panel.edit_banner.isVisibleTo(panel) and panel.send_button.text() == "Send"
    assert panel.flush_saves()
    saved = store.load(panel.conversation.id)
    assert [m.content for m in saved.messages][0] == "A better first question" and len(saved.messages) == 2


def test_enter_sends_and_shift_enter_starts_a_new_line(qtbot, panel):
    panel.sampling.max_tokens.setValue(2)
    qtbot.keyClicks(panel.input, "line one")
    qtbot.keyClick(panel.input, Qt.Key_Return, Qt.ShiftModifier)
    qtbot.keyClicks(panel.input, "line two")
    assert panel.input.toPlainText() == "line one\nline two"
    assert panel.messages.rowCount() == 0
    with qtbot.waitSignal(panel.turn_finished, timeout=TURN_TIMEOUT_MS):
        qtbot.keyClick(panel.input, Qt.Key_Return)
    assert panel.messages.message(0).content == "line one\nline two"
    assert panel.input.toPlainText() == ""
    assert panel.conversation.title == "line one"


def test_a_template_error_is_shown_and_the_conversation_kept(qtbot, panel):
    panel.runner.model_factory = factory(metadata_overrides={Keys.Tokenizer.CHAT_TEMPLATE: "{% for m in messages %}"})
    assert finish_turn(qtbot, panel, lambda: panel.send("Hello?")) == "error"
    assert roles(panel) == ["user"]                 # no empty reply bubble
    assert panel.message_bar.isVisibleTo(panel)
    assert "chat template" in panel.message_bar.text
    assert not panel.is_generating and panel.regenerate_button.isEnabled()


def test_a_conversation_longer_than_the_context_is_an_error_not_a_crash(qtbot, panel, store):
    panel.set_run_config(RunConfig(n_ctx=256))
    errors = []
    panel.error_occurred.connect(errors.append)
    assert finish_turn(qtbot, panel, lambda: panel.send("word " * 150)) == "error"
    assert len(errors) == 1 and "the context holds 256" in errors[0]
    assert roles(panel) == ["user"]
    assert panel.flush_saves()
    assert store.load(panel.conversation.id).messages[0].content == "word " * 150
    panel.set_run_config(RunConfig(n_ctx=1024))     # a new run config: the session is rebuilt with it
    assert finish_turn(qtbot, panel, panel.regenerate) == "length"
    assert panel.stats.context_bar.maximum() == 1024


def test_conversations_are_saved_listed_reopened_renamed_and_deleted(qtbot, panel, store, dialogs):
    finish_turn(qtbot, panel, lambda: panel.send("Remember this"))
    first_id = panel.conversation.id
    assert panel.flush_saves()
    assert [(s.id, s.title, s.n_messages) for s in store.list()] == [(first_id, "Remember this", 2)]
    assert panel.conversations.rowCount() == 1
    reply = panel.messages.message(1).content

    panel.new_conversation()
    assert panel.messages.rowCount() == 0 and panel.conversation.id != first_id
    panel.system_prompt.setPlainText("You are terse.")
    finish_turn(qtbot, panel, lambda: panel.send("Another topic"))
    assert panel.flush_saves()
    assert [s.title for s in store.list()] == ["Another topic", "Remember this"]
    assert store.load(panel.conversation.id).system_prompt == "You are terse."

    panel.conversation_view.setCurrentIndex(panel.conversations.index(panel.conversations.row_of(first_id)))
    assert panel.conversation.id == first_id
    assert [m.content for m in panel.messages.messages()] == ["Remember this", reply]
    assert panel.system_prompt.toPlainText() == ""

    panel.rename_conversation(first_id, "Renamed")
    assert panel.title_label.text() == "Renamed"
    assert panel.flush_saves()
    assert store.load(first_id).title == "Renamed" and store.load(first_id).titled_by_user

    assert panel.delete_conversation(first_id)
    assert dialogs.asked == ["Renamed"]
    assert panel.flush_saves()
    assert [s.title for s in store.list()] == ["Another topic"]
    assert panel.messages.rowCount() == 0 and panel.conversations.rowCount() == 1


def test_nothing_is_sent_without_a_model(qtbot, bridge, store, dialogs):
    panel = ChatPanel(bridge, store, dialogs)
    qtbot.addWidget(panel)
    assert not panel.send("hello")
    assert not panel.send_button.isEnabled() and not panel.regenerate_button.isEnabled()
    assert panel.messages.rowCount() == 0
    panel.shutdown()


def test_demo_fill_paints_a_conversation(qtbot, bridge, store, dialogs, tmp_path):
    panel = ChatPanel(bridge, store, dialogs)
    qtbot.addWidget(panel)
    panel.resize(1100, 700)
    panel.demo_fill([("user", "What is a KV cache?"), ("assistant", "The keys and values of past tokens. " * 8)],
                    title="KV cache", model_name="fixture", stats=(850.0, 31.5, 120, 4096))
    image = panel.grab().toImage()
    assert image.width() == 1100
    assert panel.message_view.visualRect(panel.messages.index(1)).height() > \
        panel.message_view.visualRect(panel.messages.index(0)).height()
    assert panel.stats.context_label.text() == "Context  <b>120</b> / 4,096"
    panel.shutdown()


def sim_gpu_placement(loaded: LoadedModel):
    from engine.devices import available_devices
    from engine.plan.placement import Placement
    n_layer = loaded.model_file.metadata["llama.block_count"]
    return Placement(loaded.inventory, available_devices("1GiB"), ["CPU"] + ["CUDA0"] * n_layer)


def test_the_session_is_kept_across_turns_and_rebuilt_for_a_new_placement(qtbot, panel, loaded):
    built = []

    def counting_factory(model_file, run_config, placement):
        built.append(placement)
        return factory()(model_file, run_config, placement)

    panel.runner.model_factory = counting_factory
    panel.sampling.temperature.setValue(0.0)
    panel.sampling.max_tokens.setValue(8)
    finish_turn(qtbot, panel, lambda: panel.send("One"))
    finish_turn(qtbot, panel, lambda: panel.send("Two"))
    assert built == [None]                      # one model and KV cache for both turns
    on_cpu = panel.messages.message(3).content
    placement = sim_gpu_placement(loaded)
    panel.set_placement(placement)
    assert panel.placement == placement and panel.placement is not placement
    finish_turn(qtbot, panel, panel.regenerate)
    assert len(built) == 2 and built[1] == placement
    assert type(panel.runner.session.model._model.ops).__name__ == "PlacedOps"
    assert panel.messages.message(3).content == on_cpu      # a placement does not change the results


def test_router_selections_of_a_turn_reach_the_heat_map(qtbot, panel):
    heats = []
    panel.expert_counts.connect(heats.append)
    panel.sampling.max_tokens.setValue(5)
    finish_turn(qtbot, panel, lambda: panel.send("Hello"))
    assert len(heats) == 1
    counts = heats[0]
    assert counts.shape == (2, 4)           # llama-moe: 2 layers x 4 experts, top-2
    # every evaluated token chose 2 experts in each layer
    assert set(counts.sum(axis=1).tolist()) == {2 * (counts.sum() // 4)}
