"""The chat panel as the app tests drive it: a panel (or its controller alone) on the llama-moe
fixture with a slowed model, dialogs that answer as the test says, and a helper that waits for a
turn to finish."""
import pytest

from app.chat_controller import ChatController
from app.engine_jobs import ChatRunner
from app.widgets.chat import ChatPanel
from slow_model import factory

TURN_TIMEOUT_MS = 240_000      # a guard against a hang, not a speed check: the first turn compiles kernels


class FakeDialogs:
    """Answers the panel's questions; `asked` records each (a title to delete, a refusal to override)."""

    def __init__(self, answer: bool = True):
        self.answer = answer            # to "delete this conversation?"
        self.run_anyway = False         # to "run a plan over capacity anyway?"
        self.asked: list[str] = []

    def confirm_delete(self, parent, title: str) -> bool:
        self.asked.append(title)
        return self.answer

    def confirm_over_capacity(self, parent, refusal: str) -> bool:
        self.asked.append(refusal)
        return self.run_anyway


@pytest.fixture
def dialogs() -> FakeDialogs:
    return FakeDialogs()


@pytest.fixture
def controller(qtbot, bridge, store, loaded):
    controller = ChatController(bridge, store, ChatRunner(factory()))
    controller.set_model(loaded)
    yield controller
    controller.shutdown()


@pytest.fixture
def panel(qtbot, bridge, store, dialogs, loaded):
    panel = ChatPanel(bridge, store, dialogs, ChatRunner(factory()))
    qtbot.addWidget(panel)
    panel.resize(1200, 760)
    panel.show()
    qtbot.waitExposed(panel)
    panel.set_model(loaded)
    panel.sampling.seed.setValue(7)
    panel.sampling.max_tokens.setValue(6)
    yield panel
    panel.shutdown()


def finish_turn(qtbot, panel, start) -> str:
    with qtbot.waitSignal(panel.turn_finished, timeout=TURN_TIMEOUT_MS) as blocker:
        assert start()
    return blocker.args[0]
