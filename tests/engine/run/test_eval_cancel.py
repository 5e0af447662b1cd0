"""`Model.eval_logits` checks for cancellation before every layer: a check that raises stops the
evaluation there, and one that never raises changes nothing."""
import numpy as np
import pytest

from engine.run.model import Model


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return Model.load(fixtures_dir / "gemma3" / "Q8_0.gguf")


def counting_layers(model):
    """Wrap the model's family so that the layers it runs are counted."""
    family, run = model.family, []

    class Counted:
        def __getattr__(self, name):
            return getattr(family, name)

        def forward_layer(self, model_, il, x, batch):
            run.append(il)
            return family.forward_layer(model_, il, x, batch)
    model.family = Counted()
    return run, family


def test_a_check_that_never_raises_changes_nothing(model):
    tokens = np.arange(2, 40, dtype=np.int32)
    calls = []
    plain = model.eval_logits(tokens)
    checked = model.eval_logits(tokens, check_cancelled=lambda: calls.append(1))
    np.testing.assert_array_equal(checked, plain)
    assert len(calls) == model.hparams.n_layer       # one ubatch: once before each layer


@pytest.mark.parametrize("stop_before", [0, 1, 3])
def test_a_raising_check_stops_before_the_next_layer(model, stop_before):
    tokens = np.arange(2, 40, dtype=np.int32)
    run, family = counting_layers(model)
    calls = []

    def check():
        if len(calls) == stop_before:
            raise Stop()
        calls.append(1)
    try:
        with pytest.raises(Stop):
            model.eval_logits(tokens, check_cancelled=check)
    finally:
        model.family = family
    assert run == list(range(stop_before))
