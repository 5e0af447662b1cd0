"""The hybrid cache: recurrent state sized by the planner's rule, checkpoints that let a
follow-up evaluate only its new tokens."""
from pathlib import Path

import numpy as np
import pytest

import forward_parity as parity
from engine.plan.memory import kv_cache_bytes, recurrent_layer_bytes, recurrent_state_bytes
from engine.run.recurrent_state import MAX_CHECKPOINTS, HybridCache

HYBRID_FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures-hybrid"


@pytest.fixture(scope="module")
def model():
    if not HYBRID_FIXTURES.is_dir():
        pytest.skip("hybrid fixtures not found")
    return parity.load(HYBRID_FIXTURES / "qwen35moe", "F16")


@pytest.fixture(scope="module")
def toks():
    return parity.tokens(HYBRID_FIXTURES / "qwen35moe")


@pytest.fixture(scope="module")
def full(model, toks):
    return model.eval_logits(toks)


def test_allocation_equals_the_planner(model):
    cache = model.new_cache()
    assert isinstance(cache, HybridCache)
    hp, rc = model.hparams, model.run_config
    assert cache.recurrent.nbytes == recurrent_state_bytes(hp, rc.replace(n_ctx=cache.n_ctx))
    assert cache.nbytes == kv_cache_bytes(hp, rc) + recurrent_state_bytes(hp, rc)
    for il in range(hp.n_layer):
        conv, ssm = cache.recurrent.conv[il], cache.recurrent.ssm[il]
        assert (0, 0) == recurrent_layer_bytes(hp, il, rc) if conv is None else \
            (conv.nbytes, ssm.nbytes) == recurrent_layer_bytes(hp, il, rc)


def test_follow_up_from_a_checkpoint_evaluates_only_new_tokens(model, toks, full):
    cache = model.new_cache()
    model.eval_logits(toks[:40], cache)
    cache.checkpoint()                              # a turn boundary
    model.eval_logits(toks[40:52], cache)           # a reply that the next turn edits away
    cache.truncate(46)                              # the new turn shares 46 tokens
    assert cache.n_past == 40                       # the newest checkpoint at or before 46
    resumed = model.eval_logits(toks[40:], cache)
    assert parity.rel(resumed, full[40:]) < 1e-5


def test_rewinding_past_every_checkpoint_starts_over(model, toks, full):
    cache = model.new_cache()
    model.eval_logits(toks[:30], cache)
    cache.checkpoint()
    model.eval_logits(toks[30:40], cache)
    cache.truncate(20)
    assert cache.n_past == 0 and cache.checkpoints == []
    assert all(not a.any() for a in cache.recurrent.ssm if a is not None)
    assert parity.rel(model.eval_logits(toks[:24], cache), full[:24]) < 1e-5


def test_checkpoints_are_bounded_and_dropped_when_rewound_past(model, toks):
    cache = model.new_cache()
    for end in range(8, 8 * (MAX_CHECKPOINTS + 3), 8):
        model.eval_logits(toks[end - 8:end], cache)
        cache.checkpoint()
    assert len(cache.checkpoints) == MAX_CHECKPOINTS
    cache.truncate(cache.checkpoints[1].n_past + 3)
    assert [c.n_past for c in cache.checkpoints] == [cache.checkpoints[0].n_past, cache.n_past]


def test_a_recurrent_state_only_continues_its_sequence(model, toks):
    cache = model.new_cache()
    model.eval_logits(toks[:10], cache)
    with pytest.raises(ValueError, match="positions must run from 10"):
        model.eval_logits(toks[10:12], cache, positions=np.array([11, 12]))


def test_chat_session_follow_up_regenerate_and_edit_resume_from_checkpoints(model, toks, full):
    from engine.run.generate import Session
    session = Session(model, n_ctx=256)
    session.prefill(list(toks[:30]))
    assert session.prompt_evaluated == 30
    for t in toks[30:40]:                   # the reply, token by token
        session.step(int(t))
    session.checkpoint()                    # end of the reply: a turn boundary

    assert session.reusable_prefix(list(toks[:56])) == 40
    follow_up = session.prefill(list(toks[:56]))
    assert session.prompt_evaluated == 16               # only the new message
    assert parity.rel(follow_up[None], full[55:56]) < 1e-5

    for t in toks[56:60]:                   # a reply that gets regenerated
        session.step(int(t))
    regenerated = session.prefill(list(toks[:56]))
    assert session.prompt_evaluated == 1                # back to the checkpoint before the prompt's last token
    assert parity.rel(regenerated[None], full[55:56]) < 1e-5

    edited = [*toks[:45], *toks[50:54]]     # an earlier message edited: back to the reply's end
    assert session.reusable_prefix(edited) == 40
    logits = session.prefill(edited)
    assert session.prompt_evaluated == len(edited) - 40
    reference = model.eval_logits(np.array(edited))[-1:]
    assert parity.rel(logits[None], reference) < 1e-5


def test_generation_events_say_how_many_prompt_tokens_were_evaluated(model, toks):
    from engine.run.generate import Session, generate
    from engine.run.sampling import SamplerSettings
    session = Session(model, n_ctx=256)
    greedy = SamplerSettings(temperature=0.0)
    first = list(generate(session, list(toks[:20]), greedy, max_tokens=4))[-1]
    assert (first.prompt_tokens, first.prompt_evaluated) == (20, 20)
    prompt = [*session.tokens, *toks[20:26]]
    second = list(generate(session, prompt, greedy, max_tokens=2))[-1]
    assert (second.prompt_tokens, second.prompt_evaluated) == (len(prompt), 6)


def test_checkpoints_of_a_state_on_an_emulated_gpu(toks, full):
    """The DeltaNet layers on an emulated CUDA device: checkpoints are copies in its memory, and
    rewinding to one, or past every one, resumes as the CPU's full evaluation does."""
    from engine.devices import Device, emulated_gpus
    from engine.plan.inventory import Inventory
    from engine.plan.llama_args import parse_llama_args
    from engine.gguf.model_file import ModelFile
    from engine.run.model import Model
    path = HYBRID_FIXTURES / "qwen35moe" / "F16.gguf"
    devices = [Device("CPU", "cpu", 64 << 30)] + emulated_gpus("16GiB")
    placement = parse_llama_args("-ngl 99", Inventory.from_model_file(ModelFile(path)), devices).placement
    model = Model.load(path, parity.load(HYBRID_FIXTURES / "qwen35moe", "F16").run_config, placement=placement)
    runtime = model.ops.backends["CUDA0"].runtime
    cache = model.new_cache()
    model.eval_logits(toks[:40], cache)
    cache.checkpoint()
    assert all(a.memory is runtime for a in cache.recurrent.layers if a is not None)
    assert all(type(a) is type(cache.recurrent.ssm[0]) for a in cache.checkpoints[0].states[0])
    model.eval_logits(toks[40:52], cache)
    cache.truncate(46)
    assert cache.n_past == 40
    assert parity.rel(model.eval_logits(toks[40:], cache), full[40:]) < 1e-4
    cache.truncate(20)
    assert cache.n_past == 0 and not any(runtime.download(a).any() for a in cache.recurrent.ssm if a is not None)
    assert parity.rel(model.eval_logits(toks[:24], cache), full[:24]) < 1e-4
