"""A real engine model made slow and talkative, for tests of turns that must still be running."""
import time

import numpy as np

from app.engine_jobs import default_model_factory
from engine.text.tokenizer import Tokenizer


class ModelForTests:
    """The real model, slowed down per evaluation and, when `endless`, never picking an
    end-of-generation token: replies run to max_tokens or a Stop, whatever the random weights say."""

    def __init__(self, model, delay_s: float, endless: bool, metadata_overrides: dict | None = None):
        self._model = model
        self._delay_s = delay_s
        self._eog_ids = sorted(Tokenizer.from_metadata(model.metadata).eog_ids) if endless else []
        self.metadata = {**model.metadata, **(metadata_overrides or {})}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eval_logits(self, tokens, cache=None, positions=None, **kwargs):
        time.sleep(self._delay_s)
        logits = self._model.eval_logits(tokens, cache, positions, **kwargs)
        if self._eog_ids:
            logits[:, self._eog_ids] = np.float32(-1e9)
        return logits


def factory(delay_s: float = 0.0, endless: bool = True, metadata_overrides: dict | None = None):
    def make(model_file, run_config, placement):
        return ModelForTests(default_model_factory(model_file, run_config, placement), delay_s, endless,
                             metadata_overrides)
    return make
