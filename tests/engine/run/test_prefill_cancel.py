"""A chat prefill cancelled inside a ubatch stops before the next layer, leaves the session with
only whole ubatches, and the next prompt gives the logits of a fresh session."""
import threading

import numpy as np
import pytest

from engine.run.generate import Session
from engine.run.model import Model
from engine.run_config import RunConfig

RUN = RunConfig(n_ctx=128, n_ubatch=8, activations="f32", type_k="f32", type_v="f32")


def cancel_at_layer(model, cancel: threading.Event, ubatch: int, layer: int):
    """Set `cancel` when the given layer of the given ubatch (counting from 0) starts."""
    family, seen = model.family, {"ubatch": -1}

    class Hooked:
        def __getattr__(self, name):
            return getattr(family, name)

        def forward_layer(self, model_, il, x, batch):
            if il == 0:
                seen["ubatch"] += 1
            if seen["ubatch"] == ubatch and il == layer:
                cancel.set()
            return family.forward_layer(model_, il, x, batch)
    model.family = Hooked()
    return family


@pytest.mark.parametrize("fixture", [("llama-dense", "F32.gguf"), ("qwen35", "F16.gguf")])
def test_a_prefill_stopped_inside_a_ubatch_keeps_only_whole_ones(fixtures_dir, fixture):
    root = fixtures_dir if fixture[0] != "qwen35" else fixtures_dir.parent / "fixtures-hybrid"
    path = root / fixture[0] / fixture[1]
    if not path.exists():
        pytest.skip(f"{path} not found")
    tokens = [int(t) for t in np.load(path.parent / "tokens.npy")[:30]]
    model = Model.load(path, RUN)
    session = Session(model)
    cancel = threading.Event()
    family = cancel_at_layer(model, cancel, ubatch=2, layer=0)     # stops before layer 1
    try:
        assert session.prefill(tokens, cancel=cancel) is None
    finally:
        model.family = family
    assert len(session.tokens) <= 16 and session.tokens == tokens[:len(session.tokens)]
    assert session.cache.n_past == len(session.tokens)
    resumed = session.prefill(tokens)
    fresh = Session(Model.load(path, RUN)).prefill(tokens)
    np.testing.assert_allclose(resumed, fresh, rtol=1e-5, atol=1e-5)
