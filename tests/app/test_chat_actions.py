"""Chat actions that must never lose work or run what the plan says cannot run: a plan over
capacity is refused before anything loads, Esc stops a reply, the focus goes back to the message
box after Stop, Regenerate keeps the earlier reply as an alternative."""
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.conversations import ConversationStore
from app.engine_jobs import ChatRunner
from app.widgets.chat import ChatPanel
from chat_support import TURN_TIMEOUT_MS, finish_turn
from slow_model import factory

REFUSAL = ("Does not fit: CUDA0 over by 5.6 GiB. Loading it would run out of memory. Ways out: Auto-fit in the "
           "Designer, a smaller context (now 8,192 tokens), a smaller KV cache type, or a smaller quant of the model.")


def test_a_plan_over_capacity_is_refused_before_anything_loads(qtbot, panel, dialogs):
    panel.set_fit_refusal(REFUSAL)
    built, real = [], panel.runner.model_factory

    def counting_factory(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)
    panel.runner.model_factory = counting_factory
    panel.input.setPlainText("Hello")
    qtbot.keyClick(panel.input, Qt.Key_Return)
    assert dialogs.asked == [REFUSAL]
    assert not panel.is_generating and panel.messages.rowCount() == 0 and built == []
    assert panel.input.toPlainText() == "Hello"          # the message is not lost either
    assert "Does not fit: CUDA0 over by 5.6 GiB" in panel.message_bar.label.text()
    assert not panel.controller.send("Hello", panel.sampler_settings(), 4)     # the controller refuses too


def test_running_anyway_is_an_explicit_choice_for_that_plan_only(qtbot, panel, dialogs):
    panel.set_fit_refusal(REFUSAL)
    dialogs.run_anyway = True
    assert finish_turn(qtbot, panel, lambda: panel.send("Hello")) in ("stop", "length")
    assert dialogs.asked == [REFUSAL]
    finish_turn(qtbot, panel, lambda: panel.send("Again"))      # not asked twice for the same plan
    assert len(dialogs.asked) == 1
    other = REFUSAL.replace("5.6 GiB", "7.1 GiB")
    panel.set_fit_refusal(other)                                 # another plan: asked again
    dialogs.run_anyway = False
    assert not panel.send("Third")
    assert dialogs.asked[-1] == other
    panel.set_fit_refusal("")                                    # a plan that fits runs without a question
    finish_turn(qtbot, panel, lambda: panel.send("Fits now"))
    assert len(dialogs.asked) == 2


def test_escape_stops_the_reply_and_the_focus_goes_back_to_the_message_box(qtbot, panel):
    panel.runner.model_factory = factory(delay_s=0.03)
    panel.sampling.max_tokens.setValue(100_000)
    assert panel.send("Tell me a long story")
    qtbot.waitUntil(lambda: len(panel.messages.message(1).content) > 0, timeout=TURN_TIMEOUT_MS)
    panel.stop_button.setFocus()
    with qtbot.waitSignal(panel.turn_finished, timeout=60_000) as blocker:
        qtbot.keyClick(panel.input, Qt.Key_Escape)
    assert blocker.args == ["cancelled"]
    assert panel.messages.message(1).content
    qtbot.waitUntil(lambda: QApplication.focusWidget() is panel.input)
    qtbot.keyClicks(QApplication.focusWidget(), "next")
    assert panel.input.toPlainText() == "next" and panel.system_prompt.toPlainText() == ""


def test_focus_after_the_stop_button_is_the_message_box(qtbot, panel):
    panel.runner.model_factory = factory(delay_s=0.03)
    panel.sampling.max_tokens.setValue(100_000)
    assert panel.send("Tell me a long story")
    qtbot.waitUntil(lambda: len(panel.messages.message(1).content) > 0, timeout=TURN_TIMEOUT_MS)
    with qtbot.waitSignal(panel.turn_finished, timeout=60_000):
        qtbot.mouseClick(panel.stop_button, Qt.LeftButton)
    assert QApplication.focusWidget() is panel.input
    assert panel.system_prompt.toPlainText() == ""


# --- regenerate keeps the earlier replies ---------------------------------------------------------

def test_regenerate_keeps_the_earlier_reply_as_an_alternative(qtbot, panel, store):
    from app.models.chat import StatsRole
    panel.sampling.temperature.setValue(1.0)
    finish_turn(qtbot, panel, lambda: panel.send("Name three colours"))
    first = panel.messages.message(1).content
    assert first
    panel.sampling.seed.setValue(8)
    finish_turn(qtbot, panel, panel.regenerate)
    reply = panel.messages.message(1)
    assert [m.role for m in panel.messages.messages()] == ["user", "assistant"]
    assert reply.content != first and [m.content for m in reply.alternatives] == [first] and reply.version == 1
    assert panel.messages.data(panel.messages.index(1), StatsRole).startswith("‹ 2/2 ›")
    second = reply.content
    assert panel.show_alternative(1, -1)
    assert panel.messages.message(1).content == first
    assert panel.messages.data(panel.messages.index(1), StatsRole).startswith("‹ 1/2 ›")
    assert not panel.show_alternative(1, -1)
    assert panel.flush_saves()
    saved = store.load(panel.conversation.id).messages[1]
    assert saved.content == first and [m.content for m in saved.alternatives] == [second]
    assert saved.stats["model"] == panel.loaded.name and saved.stats["sampling"]["seed"] == 7
    assert {"n_ctx", "type_k", "type_v", "flash_attn"} <= set(saved.stats)


def painted_pixels(view, rect) -> int:
    """How many pixels of the view inside `rect` differ from its background: a glyph is painted there."""
    from app.widgets.chat_widgets import VIEW_BACKGROUND
    image = view.viewport().grab().toImage()
    box = rect.toAlignedRect()
    return sum(image.pixelColor(x, y).rgb() != VIEW_BACKGROUND.rgb()
               for x in range(box.left(), box.right() + 1) for y in range(box.top(), box.bottom() + 1))


def test_the_arrows_under_a_reply_switch_between_the_kept_replies(qtbot, panel):
    from app.models.chat import StatsRole
    panel.sampling.temperature.setValue(1.0)
    finish_turn(qtbot, panel, lambda: panel.send("Name three colours"))
    first = panel.messages.message(1).content
    panel.sampling.seed.setValue(8)
    finish_turn(qtbot, panel, panel.regenerate)
    second = panel.messages.message(1).content
    assert second != first
    view = panel.message_view
    index = panel.messages.index(1)
    view.scrollTo(index)

    def arrows():
        return view.delegate.alternative_arrows(view.visualRect(index), index)
    previous, following = arrows()
    assert previous.right() < following.left()
    # the arrows are where the footer's "‹" and "›" are painted
    assert painted_pixels(view, previous) > 0 and painted_pixels(view, following) > 0
    between = previous.united(following).center().toPoint()
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=between)           # on "1/2": nothing changes
    assert panel.messages.message(1).content == second
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=previous.center().toPoint())
    assert panel.messages.message(1).content == first
    assert panel.messages.data(index, StatsRole).startswith("‹ 1/2 ›")
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=arrows()[0].center().toPoint())    # already the first
    assert panel.messages.message(1).content == first
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=arrows()[1].center().toPoint())
    assert panel.messages.message(1).content == second
    assert panel.messages.data(index, StatsRole).startswith("‹ 2/2 ›")
    # the user's message has no arrows
    assert view.delegate.alternative_arrows(view.visualRect(panel.messages.index(0)), panel.messages.index(0)) is None


def test_stop_right_after_regenerate_gives_the_earlier_reply_back(qtbot, panel, store):
    finish_turn(qtbot, panel, lambda: panel.send("Hello"))
    first = panel.messages.message(1).content
    panel.runner.model_factory = factory(delay_s=5.0)         # the new reply would take a while to start
    panel.runner.release()      # (the idle runner keeps its session: without this the old, fast model answers)
    with qtbot.waitSignal(panel.turn_finished, timeout=TURN_TIMEOUT_MS) as blocker:
        assert panel.regenerate()
        panel.stop()
    assert blocker.args == ["cancelled"]
    assert [m.role for m in panel.messages.messages()] == ["user", "assistant"]
    assert panel.messages.message(1).content == first
    assert panel.flush_saves()
    saved = store.load(panel.conversation.id)
    assert [m.content for m in saved.messages] == ["Hello", first]


def test_editing_an_earlier_message_keeps_the_conversation_as_it_was(qtbot, panel, store):
    finish_turn(qtbot, panel, lambda: panel.send("First question"))
    finish_turn(qtbot, panel, lambda: panel.send("Second question"))
    before = [m.content for m in panel.messages.messages()]
    finish_turn(qtbot, panel, lambda: panel.edit_and_resend(0, "A better first question"))
    assert [m.content for m in panel.messages.messages()][0] == "A better first question"
    assert panel.flush_saves()
    kept = [s for s in store.list() if s.title.endswith("(before edit)")]
    assert len(kept) == 1
    assert [m.content for m in store.load(kept[0].id).messages] == before


def test_the_built_in_base_model_is_said_to_be_one_and_offered_a_completion_prompt(qtbot, bridge, store, dialogs,
                                                                                   loaded, tmp_path):
    import dataclasses
    from app.widgets.chat import BASE_MODEL_NOTE, COMPLETION_PROMPT
    from engine.synth.default_model import GEMMA_FILE
    panel = ChatPanel(bridge, store, dialogs, ChatRunner(factory()))
    qtbot.addWidget(panel)
    panel.set_model(dataclasses.replace(loaded, path=tmp_path / GEMMA_FILE))
    assert panel.base_model_open and panel.message_bar.label.text() == BASE_MODEL_NOTE
    assert "base model" in BASE_MODEL_NOTE and panel.input.toPlainText() == COMPLETION_PROMPT
    other = ChatPanel(bridge, ConversationStore(tmp_path / "other"), dialogs, ChatRunner(factory()))
    qtbot.addWidget(other)
    other.set_model(loaded)
    assert not other.base_model_open and other.message_bar.isHidden() and other.input.toPlainText() == ""
    panel.shutdown()
    other.shutdown()


def test_kernels_are_prepared_before_the_first_turn_is_timed(qtbot, panel):
    statuses = []
    panel.controller.status_changed.connect(statuses.append)
    evaluated = []
    real = panel.runner.model_factory

    def recording_factory(*args):
        model = real(*args)
        original = model.eval_logits
        model.eval_logits = lambda tokens, *a, **k: evaluated.append(len(tokens)) or original(tokens, *a, **k)
        return model
    panel.runner.model_factory = recording_factory
    finish_turn(qtbot, panel, lambda: panel.send("Hello"))
    assert "Preparing kernels…" in statuses
    assert evaluated[0] == 1            # one token in a throwaway cache, before the prompt
    assert panel.last_turn.reused_tokens == 0


def test_a_base_model_continues_the_text_without_a_chat_template(qtbot, bridge, store, dialogs, loaded, tmp_path):
    import dataclasses
    from engine.synth.default_model import GEMMA_FILE
    from engine.text.tokenizer import Tokenizer
    panel = ChatPanel(bridge, store, dialogs, ChatRunner(factory()))
    qtbot.addWidget(panel)
    panel.sampling.max_tokens.setValue(3)
    panel.set_model(dataclasses.replace(loaded, path=tmp_path / GEMMA_FILE))
    finish_turn(qtbot, panel, lambda: panel.send("Once upon a time"))
    started = panel.last_turn
    assert started.template_name == "completion (no chat template)"
    tokenizer = Tokenizer.from_metadata(loaded.model_file.metadata)
    assert started.prompt_tokens == len(tokenizer.encode("Once upon a time", add_special=True, parse_special=True))
    panel.shutdown()
