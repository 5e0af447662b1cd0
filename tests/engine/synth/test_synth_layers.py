"""synth --layers N: a real-width slice of a big model."""
from __future__ import annotations

import pytest

from engine.synth.presets import preset
from engine.synth.writer import plan_tensors, with_layers


def test_layers_keep_the_widths_and_cut_the_depth():
    full_hp, full = plan_tensors(preset("qwen3-30b-a3b"), "Q4_K_M")
    hp, cut = plan_tensors(with_layers(preset("qwen3-30b-a3b"), 6), "Q4_K_M")
    assert hp.n_layer == 6 and full_hp.n_layer > 6
    assert (hp.n_embd, hp.n_expert, hp.n_vocab) == (full_hp.n_embd, full_hp.n_expert, full_hp.n_vocab)
    full_by_name = {t.name: t for t in full}
    assert {t.name for t in cut} == {name for name in full_by_name
                                     if not name.startswith("blk.") or int(name.split(".")[1]) < 6}
    for t in cut:    # same shapes; the types follow llama.cpp's mix for a 6-layer model (its
        assert t.shape == full_by_name[t.name].shape     # more-bits layers are the first and last


def test_layers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="between 1 and"):
        with_layers(preset("qwen3-30b-a3b"), 0)
    with pytest.raises(ValueError, match="between 1 and"):
        with_layers(preset("qwen3-30b-a3b"), 1000)
