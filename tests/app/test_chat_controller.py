"""The chat controller without any widget: turns, streaming, cancel and conversations through its signals."""

from app.chat_controller import ChatController, TurnStats, reply_stats
from app.engine_jobs import ChatRunner
from engine.run.sampling import SamplerSettings
from chat_support import TURN_TIMEOUT_MS, finish_turn
from slow_model import factory

GREEDY = SamplerSettings(temperature=0.0)


def test_a_turn_streams_into_the_reply_and_signals_its_course(qtbot, controller):
    statuses, stats, busy, grew = [], [], [], []
    controller.status_changed.connect(statuses.append)
    controller.stats_changed.connect(stats.append)
    controller.busy_changed.connect(busy.append)
    controller.reply_grew.connect(lambda: grew.append(len(controller.messages.message(1).content)))
    with qtbot.waitSignal(controller.title_changed) as title:
        reason = finish_turn(qtbot, controller, lambda: controller.send("Count to ten", GREEDY, 7))
    assert reason == "length" and title.args == ["Count to ten"]
    assert busy == [True, False] and not controller.is_generating and controller.job is None
    assert [m.role for m in controller.messages.messages()] == ["user", "assistant"]
    reply = controller.messages.message(1)
    assert reply.stats["generation_tokens"] == 7 and reply.stats["finish_reason"] == "length"
    assert grew and grew[-1] == len(reply.content) > 0
    assert "Reading the prompt…" in statuses and "Writing…" in statuses and statuses[-1] == ""
    turn = controller.last_turn
    assert stats[0] == TurnStats(None, None, 0, turn.n_ctx)      # the prompt, before any speed is known
    last = stats[-1]
    assert (last.context_used, last.n_ctx) == (turn.prompt_tokens + 7 - 1, turn.n_ctx)  # the last token is never evaluated
    assert last.generation_tps > 0 and last.context_used == reply.stats["context_used"]


def test_nothing_goes_without_a_model_or_text_or_while_busy(qtbot, bridge, store, controller):
    idle = ChatController(bridge, store)
    assert not idle.send("hello", GREEDY, 4) and idle.messages.rowCount() == 0
    assert not controller.send("   ", GREEDY, 4)
    controller.runner.model_factory = factory(delay_s=0.02)
    assert controller.send("first", GREEDY, 100_000)
    assert not controller.send("second", GREEDY, 4) and not controller.regenerate(GREEDY, 4)
    assert not controller.new_conversation()
    with qtbot.waitSignal(controller.turn_finished, timeout=TURN_TIMEOUT_MS) as blocker:
        controller.stop()
    assert blocker.args == ["cancelled"]
    idle.shutdown()


def test_stop_keeps_the_partial_reply_and_marks_it_cancelled(qtbot, controller):
    controller.runner.model_factory = factory(delay_s=0.03)
    assert controller.send("A long story", GREEDY, 100_000)
    qtbot.waitUntil(lambda: len(controller.messages.message(1).content) > 0, timeout=TURN_TIMEOUT_MS)
    with qtbot.waitSignals([controller.job.cancelled, controller.turn_finished], timeout=10_000):
        controller.stop()
    reply = controller.messages.message(1)
    assert reply.content and reply.stats["finish_reason"] == "cancelled"
    assert 0 < reply.stats["generation_tokens"] < 100_000


def test_edit_and_resend_truncates_there_and_regenerate_repeats_a_greedy_reply(qtbot, controller):
    finish_turn(qtbot, controller, lambda: controller.send("One", GREEDY, 5))
    finish_turn(qtbot, controller, lambda: controller.send("Two", GREEDY, 5))
    assert controller.can_edit(2) and not controller.can_edit(1)
    finish_turn(qtbot, controller, lambda: controller.edit_and_resend(0, "Uno", GREEDY, 5))
    assert [m.content for m in controller.messages.messages()][0] == "Uno" and controller.messages.rowCount() == 2
    first = controller.messages.message(1).content
    finish_turn(qtbot, controller, lambda: controller.regenerate(GREEDY, 5))
    assert controller.messages.message(1).content == first
    assert controller.last_turn.reused_tokens == controller.last_turn.prompt_tokens - 1


def test_an_error_leaves_no_empty_reply_and_is_signalled(qtbot, controller):
    from engine.run_config import RunConfig
    controller.set_run_config(RunConfig(n_ctx=256))
    with qtbot.waitSignal(controller.error_occurred, timeout=TURN_TIMEOUT_MS) as error:
        assert finish_turn(qtbot, controller, lambda: controller.send("word " * 150, GREEDY, 4)) == "error"
    assert "the context holds 256" in error.args[0]
    assert [m.role for m in controller.messages.messages()] == ["user"]


def test_conversations_are_saved_reopened_renamed_and_deleted(qtbot, controller, store):
    saved = []
    controller.conversation_saved.connect(saved.append)
    controller.set_system_prompt("Be brief.")
    finish_turn(qtbot, controller, lambda: controller.send("Keep this", GREEDY, 3))
    first_id = controller.conversation.id
    assert saved and set(saved) == {first_id}
    assert controller.flush_saves() and store.load(first_id).system_prompt == "Be brief."
    with qtbot.waitSignal(controller.conversation_shown) as shown:
        assert controller.new_conversation()
    assert shown.args[0].id != first_id and controller.messages.rowCount() == 0
    assert controller.open_conversation(first_id) and controller.messages.rowCount() == 2
    with qtbot.waitSignal(controller.title_changed) as title:
        controller.rename_conversation(first_id, "Renamed")
    assert title.args == ["Renamed"] and controller.title_of(first_id) == "Renamed"
    assert controller.flush_saves() and store.load(first_id).titled_by_user
    assert controller.delete_conversation(first_id)
    assert controller.flush_saves() and store.list() == [] and controller.conversations.rowCount() == 0
    assert controller.conversation.id != first_id and controller.title_of(first_id) is None


def test_reply_stats_keep_what_the_bubble_prints():
    assert reply_stats(None, "cancelled") == {"finish_reason": "cancelled"}


def test_a_controller_deleted_mid_turn_leaves_the_job_to_end_quietly(qtbot, bridge, store, loaded):
    import shiboken6
    from PySide6.QtCore import QObject
    owner = QObject()       # a panel closed while its reply streams
    controller = ChatController(bridge, store, ChatRunner(factory(delay_s=0.02)), parent=owner)
    controller.set_model(loaded)
    assert controller.send("Go on and on", GREEDY, 100_000)
    handle = controller.job
    controller.shutdown()
    shiboken6.delete(owner)
    with qtbot.waitSignal(handle.finished, timeout=TURN_TIMEOUT_MS):
        pass            # the job's cancelled/finished reach no deleted object (pytest-qt fails on any slot error)
