"""Chat templates: built-ins against llama.cpp's formatters, GGUF templates, helpers, and the sandbox."""
from __future__ import annotations

import copy
import time
from datetime import datetime
from pathlib import Path

import pytest

from engine.text.chat_template import (
                                       BUILTIN_TEMPLATES,
                                       ChatTemplate,
                                       ChatTemplateError,
                                       RenderLimits,
                                       builtin_name_for_model,
                                       detect_builtin_name,
                                       )

CLOCK = lambda: datetime(2025, 3, 7, 12, 30)  # noqa: E731

# Whitespace around contents shows which formats trim (llama.cpp's trim(): " \t\n\v\f\r").
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hello! "},
    {"role": "assistant", "content": "Hi.\n"},
    {"role": "user", "content": "Name a colour."},
]

# What llama.cpp's llm_chat_apply_template (src/llama-chat.cpp) writes for CONVERSATION with
# add_ass = true, worked out by hand from its code, one format at a time.
LLAMA_CPP_OUTPUT = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hello! <|im_end|>\n"
              "<|im_start|>assistant\nHi.\n<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama2": "[INST] Be brief.\n Hello!  [/INST]Hi.\n</s>[INST] Name a colour. [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello!  [/INST]Hi.\n</s>[INST] Name a colour. [/INST]",
    "llama2-sys-bos": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello!  [/INST]Hi.\n</s><s>[INST] Name a colour. [/INST]",
    "llama2-sys-strip": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST]Hi.</s>[INST] Name a colour. [/INST]",
    "mistral-v1": " [INST] Be brief.\n\n Hello!  [/INST] Hi.\n</s> [INST] Name a colour. [/INST]",
    "mistral-v3": "[INST] Be brief.\n\n Hello! [/INST] Hi.</s>[INST] Name a colour.[/INST]",
    "mistral-v3-tekken": "[INST]Be brief.\n\n Hello! [/INST]Hi.\n</s>[INST]Name a colour.[/INST]",
    "mistral-v7": "[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT][INST]  Hello! [/INST] Hi.\n</s>[INST] Name a colour.[/INST]",
    "mistral-v7-tekken": "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST] Hello! [/INST]Hi.\n</s>[INST]Name a colour.[/INST]",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\n Hello! <|end|>\n<|assistant|>\nHi.\n<|end|>\n"
            "<|user|>\nName a colour.<|end|>\n<|assistant|>\n",
    "phi4": "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|> Hello! <|im_end|>"
            "<|im_start|>assistant<|im_sep|>Hi.\n<|im_end|><|im_start|>user<|im_sep|>Name a colour.<|im_end|>"
            "<|im_start|>assistant<|im_sep|>",
    "falcon3": "<|system|>\nBe brief.\n<|user|>\n Hello! \n<|assistant|>\nHi.\n\n<|user|>\nName a colour.\n<|assistant|>\n",
    "zephyr": "<|system|>\nBe brief.<|endoftext|>\n<|user|>\n Hello! <|endoftext|>\n<|assistant|>\nHi.\n<|endoftext|>\n"
              "<|user|>\nName a colour.<|endoftext|>\n<|assistant|>\n",
    "monarch": "system\nBe brief.</s>\n<s>user\n Hello! </s>\n<s>assistant\nHi.\n</s>\n<s>user\nName a colour.</s>\n"
               "<s>assistant\n",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
             "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n",
    "orion": "Human: Be brief.\n\n Hello! \n\nAssistant: </s>Hi.\n</s>Human: Name a colour.\n\nAssistant: </s>",
    "openchat": "Be brief.<|end_of_turn|>GPT4 Correct User:  Hello! <|end_of_turn|>GPT4 Correct Assistant: Hi.\n"
                "<|end_of_turn|>GPT4 Correct User: Name a colour.<|end_of_turn|>GPT4 Correct Assistant:",
    "vicuna": "Be brief.\n\nUSER:  Hello! \nASSISTANT: Hi.\n</s>\nUSER: Name a colour.\nASSISTANT:",
    "vicuna-orca": "SYSTEM: Be brief.\nUSER:  Hello! \nASSISTANT: Hi.\n</s>\nUSER: Name a colour.\nASSISTANT:",
    "deepseek": "Be brief.### Instruction:\n Hello! \n### Response:\nHi.\n\n<|EOT|>\n### Instruction:\nName a colour.\n"
                "### Response:\n",
    "deepseek2": "Be brief.\n\nUser:  Hello! \n\nAssistant: Hi.\n<｜end▁of▁sentence｜>User: Name a colour.\n\nAssistant:",
    "deepseek3": "Be brief.\n\n<｜User｜> Hello! <｜Assistant｜>Hi.\n<｜end▁of▁sentence｜><｜User｜>Name a colour.<｜Assistant｜>",
    "deepseek-ocr": "Be brief. Hello! Hi.\nName a colour.",
    "command-r": "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
                 "<|USER_TOKEN|>Hello!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi."
                 "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Name a colour.<|END_OF_TURN_TOKEN|>"
                 "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatglm3": "[gMASK]sop<|system|>\n Be brief.<|user|>\n  Hello! <|assistant|>\n Hi.\n<|user|>\n Name a colour.<|assistant|>",
    "chatglm4": "[gMASK]<sop><|system|>\nBe brief.<|user|>\n Hello! <|assistant|>\nHi.\n<|user|>\nName a colour.<|assistant|>\n",
    "glmedge": "<|system|>\nBe brief.<|user|>\n Hello! <|assistant|>\nHi.\n<|user|>\nName a colour.<|assistant|>",
    "minicpm": "Be brief.<用户>Hello!<AI>Hi.<用户>Name a colour.<AI>",
    "exaone3": "[|system|]Be brief.[|endofturn|]\n[|user|]Hello!\n[|assistant|]Hi.[|endofturn|]\n[|user|]Name a colour.\n"
               "[|assistant|]",
    "exaone4": "[|system|]Be brief.[|endofturn|]\n[|user|]Hello!\n[|assistant|]Hi.[|endofturn|]\n[|user|]Name a colour.\n"
               "[|assistant|]",
    "exaone-moe": "<|system|>\nBe brief.<|endofturn|>\n<|user|>\nHello!<|endofturn|>\n<|assistant|>\nHi.<|endofturn|>\n"
                  "<|user|>\nName a colour.<|endofturn|>\n<|assistant|>\n",
    "rwkv-world": "System: Be brief.\n\nUser: Hello!\n\nAssistant: Hi.\n\nUser: Name a colour.\n\nAssistant:",
    "granite": "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>"
               " Hello! <|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>Hi.\n<|end_of_text|>\n"
               "<|start_of_role|>user<|end_of_role|>Name a colour.<|end_of_text|>\n"
               "<|start_of_role|>assistant<|end_of_role|>",
    "gigachat": "<s>Be brief.<|message_sep|>user<|role_sep|> Hello! <|message_sep|>available functions<|role_sep|>[]"
                "<|message_sep|>assistant<|role_sep|>Hi.\n<|message_sep|>user<|role_sep|>Name a colour.<|message_sep|>"
                "available functions<|role_sep|>[]<|message_sep|>assistant<|role_sep|>",
    "megrez": "<|role_start|>system<|role_end|>Be brief.<|turn_end|><|role_start|>user<|role_end|> Hello! <|turn_end|>"
              "<|role_start|>assistant<|role_end|>Hi.\n<|turn_end|><|role_start|>user<|role_end|>Name a colour."
              "<|turn_end|><|role_start|>assistant<|role_end|>",
    "yandex": " Пользователь:  Hello! \n\n Ассистент: Hi.\n\n\n Пользователь: Name a colour.\n\n Ассистент:[SEP]",
    "bailing": "<role>SYSTEM</role>Be brief.<role>HUMAN</role> Hello! <role>ASSISTANT</role>Hi.\n"
               "<role>HUMAN</role>Name a colour.<role>ASSISTANT</role>",
    "bailing-think": "<role>SYSTEM</role>Be brief.<role>HUMAN</role> Hello! <role>ASSISTANT</role>Hi.\n"
                     "<role>HUMAN</role>Name a colour.<role>ASSISTANT</role><think>",
    "bailing2": "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role> Hello! <|role_end|><role>ASSISTANT</role>Hi.\n"
                "<|role_end|><role>HUMAN</role>Name a colour.<|role_end|><role>ASSISTANT</role>",
    "llama4": "<|header_start|>system<|header_end|>\n\nBe brief.<|eot|><|header_start|>user<|header_end|>\n\nHello!<|eot|>"
              "<|header_start|>assistant<|header_end|>\n\nHi.<|eot|><|header_start|>user<|header_end|>\n\n"
              "Name a colour.<|eot|><|header_start|>assistant<|header_end|>\n\n",
    "smolvlm": "<|im_start|>Be brief.\n\nUser:  Hello! <end_of_utterance>\nAssistant: Hi.\n<end_of_utterance>\n"
               "User: Name a colour.<end_of_utterance>\nAssistant:",
    "dots1": "<|system|>Be brief.<|endofsystem|><|userprompt|> Hello! <|endofuserprompt|><|response|>Hi.\n"
             "<|endofresponse|><|userprompt|>Name a colour.<|endofuserprompt|><|response|>",
    "hunyuan-moe": "<|startoftext|>Be brief.<|extra_4|><|startoftext|> Hello! <|extra_0|>Hi.\n<|eos|>"
                   "<|startoftext|>Name a colour.<|extra_0|>",
    "gpt-oss": "<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|> Hello! <|end|>"
               "<|start|>assistant<|message|>Hi.\n<|return|><|start|>user<|message|>Name a colour.<|end|>"
               "<|start|>assistant",
    "hunyuan-dense": "Be brief.<｜hy_place▁holder▁no▁3｜><｜hy_User｜> Hello! <｜hy_Assistant｜><｜hy_Assistant｜>Hi.\n"
                     "<｜hy_place▁holder▁no▁2｜><｜hy_User｜>Name a colour.<｜hy_Assistant｜>",
    "hunyuan-vl": "<｜hy_begin▁of▁sentence｜>Be brief.<｜hy_place▁holder▁no▁3｜> Hello! <｜hy_User｜>Hi.\n"
                  "<｜hy_Assistant｜>Name a colour.<｜hy_User｜>",
    "kimi-k2": "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|> Hello! <|im_end|>"
               "<|im_assistant|>assistant<|im_middle|>Hi.\n<|im_end|><|im_user|>user<|im_middle|>Name a colour."
               "<|im_end|><|im_assistant|>assistant<|im_middle|>",
    "seed_oss": "<seed:bos>system\nBe brief.<seed:eos><seed:bos>user\n Hello! <seed:eos><seed:bos>assistant\nHi."
                "<seed:eos><seed:bos>user\nName a colour.<seed:eos><seed:bos>assistant\n",
    "grok-2": "System: Be brief.<|separator|>\n\nHuman: Hello!<|separator|>\n\nAssistant: Hi.\n<|separator|>\n\n"
              "Human: Name a colour.<|separator|>\n\nAssistant:",
    "pangu-embedded": "[unused9]系统：Be brief.[unused10][unused9]用户： Hello! [unused10][unused9]助手：Hi.\n[unused10]"
                      "[unused9]用户：Name a colour.[unused10][unused9]助手：",
    "solar-open": "<|begin|>system<|content|>Be brief.<|end|><|begin|>user<|content|> Hello! <|end|>"
                  "<|begin|>assistant<|content|>Hi.\n<|end|><|begin|>user<|content|>Name a colour.<|end|>"
                  "<|begin|>assistant",
}
LLAMA_CPP_OUTPUT["granite-4.0"] = LLAMA_CPP_OUTPUT["granite-4.1"] = LLAMA_CPP_OUTPUT["granite"]

# The names in llama.cpp's LLM_CHAT_TEMPLATES table.
LLAMA_CPP_TEMPLATE_NAMES = """chatml llama2 llama2-sys llama2-sys-bos llama2-sys-strip mistral-v1 mistral-v3
    mistral-v3-tekken mistral-v7 mistral-v7-tekken phi3 phi4 falcon3 zephyr monarch gemma orion openchat vicuna
    vicuna-orca deepseek deepseek2 deepseek3 deepseek-ocr command-r llama3 chatglm3 chatglm4 glmedge minicpm exaone3
    exaone4 exaone-moe rwkv-world granite granite-4.0 granite-4.1 gigachat megrez yandex bailing bailing-think bailing2
    llama4 smolvlm hunyuan-moe gpt-oss hunyuan-dense hunyuan-vl kimi-k2 seed_oss grok-2 pangu-embedded
    solar-open""".split()

SIMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


def render(source: str, messages=None, **kwargs) -> str:
    limits = kwargs.pop("limits", RenderLimits(max_render_s=0.3))
    template = ChatTemplate(source, "gguf", bos_token="<s>", eos_token="</s>", limits=limits, clock=CLOCK)
    return template.render(messages or [{"role": "user", "content": "hi"}], **kwargs)


@pytest.fixture(scope="session")
def templates_dir(fixtures_dir) -> Path:
    return fixtures_dir / "templates"


def fixture_template(templates_dir: Path, name: str, **options) -> ChatTemplate:
    source = (templates_dir / f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(source, "gguf", clock=CLOCK, **options)


# ---- built-ins: the same text as llama.cpp's formatters ----

def test_every_llama_cpp_format_is_built_in_and_tested():
    assert set(LLAMA_CPP_TEMPLATE_NAMES) <= set(BUILTIN_TEMPLATES)
    assert set(BUILTIN_TEMPLATES) == set(LLAMA_CPP_OUTPUT)


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_OUTPUT))
def test_builtin_matches_llama_cpp(name):
    template = ChatTemplate.builtin(name)
    assert template.name == f"built-in {name}"
    assert template.render(CONVERSATION) == LLAMA_CPP_OUTPUT[name]


@pytest.mark.parametrize("name, tail", [
    ("chatml", "<|im_start|>assistant\n"), ("gemma", "<start_of_turn>model\n"), ("llama3", "<|end_header_id|>\n\n"),
    ("phi3", "<|assistant|>\n"), ("deepseek3", "<｜Assistant｜>"), ("llama4", "<|header_end|>\n\n"),
    ("bailing-think", "<think>"),
])
def test_builtin_without_generation_prompt_drops_only_the_prompt(name, tail):
    with_prompt = ChatTemplate.builtin(name).render(CONVERSATION, add_generation_prompt=True)
    without = ChatTemplate.builtin(name).render(CONVERSATION, add_generation_prompt=False)
    assert with_prompt.endswith(tail)
    assert with_prompt.startswith(without) and len(with_prompt) > len(without)


def test_formats_without_generation_prompt_ignore_the_flag():
    for name in ("llama2", "mistral-v3", "mistral-v7", "orion", "minicpm", "hunyuan-moe", "rwkv-world"):
        template = ChatTemplate.builtin(name)
        assert template.render(CONVERSATION, False) == template.render(CONVERSATION, True) == LLAMA_CPP_OUTPUT[name]


def test_builtin_variants_without_a_system_message():
    chat = CONVERSATION[1:]
    assert ChatTemplate.builtin("gemma").render(chat, False) == (
        "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n")
    assert ChatTemplate.builtin("bailing2").render(chat[:1]) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role> Hello! <|role_end|><role>ASSISTANT</role>")
    assert ChatTemplate.builtin("pangu-embedded").render(chat[:1]) == (
        "[unused9]系统：[unused10][unused9]用户： Hello! [unused10][unused9]助手：")
    assert ChatTemplate.builtin("gigachat").render(chat[:1]) == (
        "<s>user<|role_sep|> Hello! <|message_sep|>available functions<|role_sep|>[]<|message_sep|>assistant<|role_sep|>")
    assert ChatTemplate.builtin("rwkv-world").render(chat[:2]) == "User: Hello!\n\nAssistant: Hi.\n\n"


def test_builtin_tool_roles():
    call = [{"role": "assistant_tool_call", "content": "[{}]"}, {"role": "tool", "content": " 42 "}]
    assert ChatTemplate.builtin("granite").render(call, False) == (
        "<|start_of_role|>assistant_tool_call<|end_of_role|><|tool_call|>[{}]<|end_of_text|>\n"
        "<|start_of_role|>tool<|end_of_role|> 42 <|end_of_text|>\n")
    assert ChatTemplate.builtin("granite-4.1").render(call, False) == (
        "<|start_of_role|>assistant<|end_of_role|><|tool_call|>[{}]<|end_of_text|>\n"
        "<|start_of_role|>tool<|end_of_role|> 42 <|end_of_text|>\n")
    assert ChatTemplate.builtin("exaone4").render(call[1:], False) == "[|tool|]42[|endofturn|]\n"
    assert ChatTemplate.builtin("exaone3").render(call[1:], False) == ""
    assert ChatTemplate.builtin("kimi-k2").render(call[1:], False) == "<|im_system|>tool<|im_middle|> 42 <|im_end|>"


def test_builtin_content_parts_are_joined_with_newlines():
    chat = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}]
    assert ChatTemplate.builtin("chatml").render(chat) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ChatTemplateError, match="no such built-in template; available: bailing"):
        ChatTemplate.builtin("nope")


@pytest.mark.parametrize("name, builtin", [
    ("Qwen-Qwen2.5-7B-Instruct", "chatml"), ("Qwen-Qwen3-0.6B", "chatml"), ("microsoft-Phi-3.5-mini-instruct", "phi3"),
    ("ibm-granite-granite-3.3-2B-Instruct", "granite"), ("ibm-granite-granite-4.0", "granite-4.0"),
    ("moonshotai-Kimi-K2", "kimi-k2"), ("ByteDance-Seed-OSS", "seed_oss"),
])
def test_builtin_writes_what_the_model_template_writes(templates_dir, name, builtin):
    gguf = fixture_template(templates_dir, name).render(SIMPLE_CONVERSATION)
    assert detect_builtin_name((templates_dir / f"{name}.jinja").read_text(encoding="utf-8")) == builtin
    assert ChatTemplate.builtin(builtin).render(SIMPLE_CONVERSATION) == gguf


# ---- which built-in: llama.cpp's detection and our per-model choice ----

@pytest.mark.parametrize("source, name", [
    ("chatml", "chatml"), ("{{ '<|im_start|>' + m }}", "chatml"), ("<|im_start|><|im_sep|>", "phi4"),
    ("<|im_start|><end_of_utterance>", "smolvlm"), ("mistral-v7-tekken", "mistral-v7-tekken"),
    ("[INST] [SYSTEM_PROMPT]", "mistral-v7"), ("' [INST] ' + system_message", "mistral-v1"),
    ('"[INST]" [AVAILABLE_TOOLS]', "mistral-v3-tekken"), ("[INST][AVAILABLE_TOOLS]", "mistral-v3"),
    ("[INST] <<SYS>> content.strip()", "llama2-sys-strip"), ("bos_token + '[INST] <<SYS>>", "llama2-sys-bos"),
    ("[INST] <<SYS>>", "llama2-sys"), ("[INST]", "llama2"), ("mistral", "llama2"),
    ("<|assistant|><|end|>", "phi3"), ("[gMASK]<sop>", "chatglm4"), ("<|assistant|><|user|></s>", "falcon3"),
    ("<|assistant|><|user|>", "glmedge"), ("<|user|><|endoftext|>", "zephyr"), ("<start_of_turn>", "gemma"),
    ("USER: ASSISTANT: SYSTEM: ", "vicuna-orca"), ("USER: ASSISTANT: ", "vicuna"),
    ("### Instruction: <|EOT|>", "deepseek"), ("<|start_header_id|><|end_header_id|>", "llama3"),
    ("[gMASK]sop", "chatglm3"), ("<｜Assistant｜><｜User｜><｜end▁of▁sentence｜>", "deepseek3"),
    ("[|system|][|assistant|][|endofturn|][|tool|]", "exaone4"), ("[|system|][|assistant|][|endofturn|]", "exaone3"),
    ("<|start_of_role|><tools>g4_default_system_message", "granite-4.0"), ("<|start_of_role|><tool_call>", "granite-4.1"),
    ("<|start_of_role|>", "granite"), ("<|header_start|><|header_end|>", "llama4"), ("<|start|><|channel|>", "gpt-oss"),
    ("<|im_assistant|>assistant<|im_middle|>", "kimi-k2"), ("<seed:bos>", "seed_oss"), ("{{ messages }}", None),
])
def test_detect_builtin_name(source, name):
    assert detect_builtin_name(source) == name


@pytest.mark.parametrize("name, builtin", [
    ("Qwen-Qwen2.5-7B-Instruct", "chatml"), ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
    ("google-gemma-2-2b-it", "gemma"), ("mistralai-Mistral-Nemo-Instruct-2407", "mistral-v3-tekken"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "mistral-v7"), ("deepseek-ai-DeepSeek-V3.1", "deepseek3"),
    ("openai-gpt-oss-120b", "gpt-oss"), ("ibm-granite-granite-4.1", "granite-4.1"), ("llama-cpp-rwkv-world", "rwkv-world"),
    ("inclusionai-ling-3.0-flash", "bailing2"), ("upstage-Solar-Open-100B", "solar-open"), ("Kimi-K3", None),
])
def test_detect_builtin_name_of_real_templates(templates_dir, name, builtin):
    assert detect_builtin_name((templates_dir / f"{name}.jinja").read_text(encoding="utf-8")) == builtin


@pytest.mark.parametrize("architecture, tokens, expected", [
    ("gemma3", [], "gemma"), ("llama", [], "llama2"), ("llama4", [], "llama4"), ("deepseek2", [], "deepseek2"),
    ("qwen3moe", [], "chatml"), ("some-new-arch", [], "chatml"),
    ("llama", ["<s>", "<|start_header_id|>", "<|eot_id|>"], "llama3"),
    ("llama", ["<s>", "[INST]", "[/INST]"], "mistral-v3"),
    ("deepseek2", ["<｜User｜>", "<｜Assistant｜>"], "deepseek3"),
    ("some-new-arch", ["<|im_start|>", "<|im_end|>"], "chatml"),
    ("gemma3", ["<start_of_turn>", "<end_of_turn>"], "gemma"),
])
def test_builtin_name_for_model(architecture, tokens, expected):
    assert builtin_name_for_model({"tokenizer.ggml.tokens": tokens}, architecture) == expected


def test_builtin_name_for_tekken_models():
    md = {"tokenizer.ggml.pre": "tekken", "llama.block_count": 40, "tokenizer.ggml.tokens": []}
    assert builtin_name_for_model(md, "llama") == "mistral-v7-tekken"       # llama.cpp's one-off rule
    md = {"tokenizer.ggml.pre": "tekken", "llama.block_count": 32, "tokenizer.ggml.tokens": ["[INST]", "[/INST]"]}
    assert builtin_name_for_model(md, "llama") == "mistral-v3-tekken"


@pytest.mark.parametrize("fixture, expected", [
    ("llama-dense", "llama2"), ("llama-moe", "llama2"), ("qwen3", "chatml"), ("qwen3moe", "chatml"),
    ("gemma3", "gemma"), ("llama4", "llama4"), ("deepseek2", "deepseek2"),
])
def test_fixture_models_get_their_family_builtin(fixtures_dir, fixture, expected):
    from engine.gguf.model_file import ModelFile
    path = sorted((fixtures_dir / fixture).glob("*.gguf"))[0]
    md = ModelFile(path).metadata
    template = ChatTemplate.from_metadata(md, md["general.architecture"])
    assert template.name == f"built-in {expected}"
    assert template.bos_token == "<s>" and template.eos_token == "</s>" and template.add_bos


def test_gemma3_270m_without_template_gets_gemma_format(gemma_path):
    from engine.gguf.model_file import ModelFile
    md = ModelFile(gemma_path).metadata
    assert not md.get("tokenizer.chat_template")
    template = ChatTemplate.from_metadata(md, md["general.architecture"])
    assert (template.name, template.bos_token, template.eos_token) == ("built-in gemma", "<bos>", "<eos>")
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    assert template.render_prompt(chat) == (
        "<start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n<start_of_turn>model\n")


# ---- GGUF metadata ----

def gguf_metadata(**extra):
    return {"tokenizer.ggml.tokens": ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "hi"],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True, **extra}


def test_from_metadata_uses_the_gguf_template():
    source = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    template = ChatTemplate.from_metadata(gguf_metadata(**{"tokenizer.chat_template": source}), "llama")
    assert (template.name, template.source) == ("gguf", source)
    assert template.render([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>hi<|eot_id|>"
    assert template.render_prompt([{"role": "user", "content": "hi"}]) == "hi<|eot_id|>"   # the tokenizer adds BOS


def test_from_metadata_template_naming_a_builtin():
    template = ChatTemplate.from_metadata(gguf_metadata(**{"tokenizer.chat_template": "llama3"}), "llama")
    assert template.name == "built-in llama3"
    assert template.render(CONVERSATION) == LLAMA_CPP_OUTPUT["llama3"]


def test_from_metadata_tool_use_variant():
    md = gguf_metadata(**{"tokenizer.chat_template": "plain {{ messages|length }}",
                          "tokenizer.chat_template.tool_use": "tools {{ tools|length }}"})
    template = ChatTemplate.from_metadata(md, "llama")
    assert template.render(CONVERSATION) == "plain 4"
    assert template.render(CONVERSATION, tools=[{"type": "function"}]) == "tools 1"
    only_tool_use = ChatTemplate.from_metadata(gguf_metadata(**{"tokenizer.chat_template.tool_use": "T"}), "llama")
    assert (only_tool_use.name, only_tool_use.render(CONVERSATION)) == ("gguf", "T")


def test_from_metadata_without_template_falls_back_by_vocab():
    template = ChatTemplate.from_metadata(gguf_metadata(**{"tokenizer.ggml.tokens": [
        "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"]}), "llama")
    assert template.name == "built-in llama3"


# ---- real templates ----

def test_every_fixture_template_renders(templates_dir):
    paths = sorted(templates_dir.glob("*.jinja"))
    assert len(paths) >= 70
    failures = {}
    for path in paths:
        try:
            template = ChatTemplate(path.read_text(encoding="utf-8"), "gguf", bos_token="<s>", eos_token="</s>")
            text = template.render(SIMPLE_CONVERSATION, add_generation_prompt=True)
        except ChatTemplateError as error:
            failures[path.name] = str(error)
            continue
        positions = [text.find(message["content"]) for message in SIMPLE_CONVERSATION[1:]]
        if -1 in positions or positions != sorted(positions):
            failures[path.name] = f"contents missing or out of order in {text!r}"
    assert failures == {}


def test_qwen25_prompt(templates_dir):
    template = fixture_template(templates_dir, "Qwen-Qwen2.5-7B-Instruct")
    assert template.render(SIMPLE_CONVERSATION) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert template.render(SIMPLE_CONVERSATION[1:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n")


def test_llama31_prompt(templates_dir):
    template = fixture_template(templates_dir, "meta-llama-Llama-3.1-8B-Instruct",
                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=True)
    expected_tail = (
        "\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    head = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "
    assert template.render(SIMPLE_CONVERSATION) == "<|begin_of_text|>" + head + "07 Mar 2025" + expected_tail
    assert template.render_prompt(SIMPLE_CONVERSATION) == head + "07 Mar 2025" + expected_tail
    assert template.render(SIMPLE_CONVERSATION, date_string="26 Jul 2024") == (
        "<|begin_of_text|>" + head + "26 Jul 2024" + expected_tail)


def test_template_without_system_role_gets_it_merged_into_the_first_turn(templates_dir):
    # gemma-2's template raises on a system message; llama.cpp merges it into the next turn with "\n"
    template = fixture_template(templates_dir, "google-gemma-2-2b-it", bos_token="<bos>")
    assert template.render(SIMPLE_CONVERSATION) == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\nHello!<end_of_turn>\n<start_of_turn>model\n"
        "Hi! How can I help?<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")


def test_template_raise_exception_is_a_chat_template_error(templates_dir):
    template = fixture_template(templates_dir, "google-gemma-2-2b-it")
    with pytest.raises(ChatTemplateError, match="gguf chat template, line 1: the template raised an error: "
                                                "Conversation roles must alternate") as caught:
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert caught.value.reason == "raised" and caught.value.line == 1


def test_kimi_tool_call_uses_list_append_and_pop(templates_dir):
    # llama.cpp's engine lets a template grow lists it built itself; Kimi-K2 needs it for tool calls
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"}]
    text = fixture_template(templates_dir, "Kimi-K2-Instruct").render(chat)
    assert text.endswith("<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18C<|im_end|>"
                         "<|im_assistant|>assistant<|im_middle|>")


def test_tools_reach_the_template(templates_dir):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = fixture_template(templates_dir, "Qwen-Qwen2.5-7B-Instruct").render(SIMPLE_CONVERSATION[1:2], tools=tools)
    assert ('<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n'
            '</tools>') in text


def test_enable_thinking_flag(templates_dir):
    template = fixture_template(templates_dir, "Qwen-Qwen3-0.6B")
    assert template.render(SIMPLE_CONVERSATION[1:2]).endswith("<|im_start|>assistant\n")
    assert template.render(SIMPLE_CONVERSATION[1:2], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_content_parts_follow_what_the_template_reads(templates_dir):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    chat = [{"role": "user", "content": parts}]
    # a string-only template gets the parts joined with "\n", as llama.cpp's concat_content_parts
    qwen = fixture_template(templates_dir, "Qwen-Qwen2.5-7B-Instruct").render(chat)
    assert "<|im_start|>user\nWhat is\n2+2?<|im_end|>" in qwen
    # a template that reads parts gets them as they are
    reader = "{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}"
    assert render(reader, chat) == "[What is][2+2?]"
    assert render(reader, [{"role": "user", "content": "plain"}]) == "[plain]"   # strings wrapped as one part


def test_typed_contents_render_in_every_fixture_template(templates_dir):
    chat = [{**message, "content": [{"type": "text", "text": message["content"]}]} for message in SIMPLE_CONVERSATION]
    for path in sorted(templates_dir.glob("*.jinja")):
        text = ChatTemplate(path.read_text(encoding="utf-8"), "gguf").render(chat)
        positions = [text.find(message["content"]) for message in SIMPLE_CONVERSATION[1:]]
        assert -1 not in positions and positions == sorted(positions), path.name
        for message in SIMPLE_CONVERSATION:      # no part printed whole
            assert f"'text': '{message['content']}'" not in text and f'"text": "{message["content"]}"' not in text


def test_developer_role_becomes_system():
    assert render("{% for m in messages %}{{ m.role }};{% endfor %}", [
        {"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]) == "system;user;"


def test_messages_of_the_caller_are_not_changed():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}]
    before = copy.deepcopy(chat)
    ChatTemplate.builtin("gemma").render(chat)
    assert chat == before


# ---- the helpers HF templates use ----

def test_tojson_takes_hf_arguments():
    value = {"b": [1, "é"], "a": None}
    assert render("{{ v|tojson }}", v=value) == '{"b": [1, "é"], "a": null}'
    assert render("{{ v|tojson(ensure_ascii=true, sort_keys=true) }}", v=value) == '{"a": null, "b": [1, "\\u00e9"]}'
    assert render("{{ v|tojson(separators=(',', ':')) }}", v=value) == '{"b":[1,"é"],"a":null}'
    assert render("{{ v|tojson(indent=2) }}", v={"a": [1]}) == '{\n  "a": [\n    1\n  ]\n}'
    assert render("{{ '<b>&'|tojson }}") == '"<b>&"'     # no HTML escaping, unlike jinja's own tojson


def test_strftime_now_raise_exception_and_globals():
    assert render("{{ strftime_now('%Y-%m-%d %H:%M') }}") == "2025-03-07 12:30"
    assert render("{{ date_string }}|{{ datetime }}") == "07 Mar 2025|Mar 07 2025"
    assert render("{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}") == "<s></s>True"
    assert render("{{ tools is defined }}") == "False"
    assert render("{{ tools|length }}", tools=[{"a": 1}, {"b": 2}]) == "2"
    with pytest.raises(ChatTemplateError, match="the template raised an error: no") as caught:
        render("{{ raise_exception('no') }}")
    assert caught.value.reason == "raised"


def test_loop_controls_and_block_whitespace():
    assert render("{% for i in range(9) %}{% if i == 2 %}{% continue %}{% endif %}"
                  "{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "0134"
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it
    assert render("{% for m in messages %}\n    {% if m.role %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n") == \
        "[user]\n"


def test_python_string_and_dict_methods():
    source = ("{% set s = '  Hello World  ' %}{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.split() }}|"
              "{{ s.strip().startswith('Hel') }}|{{ s.strip().endswith('x') }}|{{ 'ab'.upper() }}|{{ 'ab cd'.title() }}|"
              "{{ 'a-b'.replace('-', '+') }}|{{ 'A'.lower() }}|{{ 'a,b'.split(',')[1] }}|{{ '{}-{}'.format(1, 2) }}|"
              "{{ ', '.join(['x', 'y']) }}|{% for k, v in {'k': 1}.items() %}{{ k }}={{ v }}{% endfor %}|"
              "{{ {'k': 1}.get('k') }}{{ {'k': 1}.get('z', 0) }}|{{ 'abc'.find('c') }}|{{ 'aXa'.count('a') }}")
    assert render(source) == ("Hello World|Hello World  |  Hello World|['Hello', 'World']|True|False|AB|Ab Cd|a+b|a|b|"
                              "1-2|x, y|k=1|10|2|2")


@pytest.mark.parametrize("expression", ["{'a': 1}.update({'b': 2})", "{'a': 1}.pop('a')", "{'a': 1}.setdefault('b', 2)",
                                        "[1].extend([2])", "[1].insert(0, 2)", "[2, 1].sort()", "[1].remove(1)"])
def test_other_mutating_methods_are_refused(expression):
    # the immutable sandbox's rule; only append and pop on the template's own lists are let through
    with pytest.raises(ChatTemplateError, match="unsafe operation refused: access to attribute") as caught:
        render("{{ " + expression + " }}")
    assert caught.value.reason == "unsafe"


def test_generation_block_and_namespace():
    assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% generation %}<{{ m.content }}>"
                  "{% endgeneration %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}") == "<hi>1"


def test_missing_value_added_to_a_string_reads_as_empty():
    # llama.cpp's engine does this (firefunction-v2 adds an undefined `functions` to a string)
    assert render("{{ 'a' + functions + 'b' }}{{ none + 'c' }}") == "abc"


# ---- errors ----

def test_syntax_error_names_template_and_line():
    with pytest.raises(ChatTemplateError, match=r"^gguf chat template, line 2: syntax error: ") as caught:
        render("ok\n{% for %}")
    assert caught.value.reason == "syntax"


def test_render_error_names_template_and_line():
    with pytest.raises(ChatTemplateError, match=r"^built-in x chat template, line 3: UndefinedError"):
        ChatTemplate("a\nb\n{{ nothing.attribute }}", "built-in x").render([])


# ---- security: hostile templates reach nothing and stop in bounded time and memory ----

# name: (source, what the error says)
HOSTILE = {
    "class mro": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "attribute '__class__' of a 'str' object"),
    "globals via cycler": ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "attribute '__init__'"),
    "template context": ("{{ self._TemplateReference__context }}", "attribute '_TemplateReference__context'"),
    "namespace globals": ("{{ namespace.__init__.__globals__ }}", "attribute '__init__'"),
    "function globals": ("{{ raise_exception.__globals__ }}", "attribute '__globals__'"),
    "attr filter": ("{{ messages|attr('__class__') }}", "attribute '__class__' of a 'list' object"),
    "map attribute": ("{{ messages|map(attribute='__class__')|list }}", "attribute '__class__' of a 'dict' object"),
    "subscript": ("{{ messages['__class__'] }}", "attribute '__class__' of a 'list' object"),
    "format field": ("{{ '{0.__class__}'.format(messages) }}", "attribute '__class__' of a 'list' object"),
    "format_map field": ("{{ '{m.__class__.__base__}'.format_map({'m': 'x'}) }}", "attribute '__class__'"),
    "append to messages": ("{{ messages.append({'role': 'user'}) }}", "attribute 'append' of a 'list' object"),
    "pop from messages": ("{{ messages.pop() }}", "attribute 'pop' of a 'list' object"),
    "update a message": ("{% set _ = messages[0].update({'role': 'x'}) %}", "attribute 'update' of a 'dict' object"),
    "update tools": ("{% set _ = tools[0].clear() %}", "attribute 'clear' of a 'dict' object"),
    "include a file": ("{% include '/etc/passwd' %}", "cannot include, import or extend"),
    "import": ("{% import 'os' as os %}", "cannot include, import or extend"),
    "extends": ("{% extends '/etc/passwd' %}", "cannot include, import or extend"),
    "huge range": ("{% for i in range(10**9) %}{% endfor %}", "range() of 1000000000 items"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer"),
    "self-growing loop": ("{% set l = [1] %}{% for x in l %}{% set _ = l.append(x) %}{% endfor %}", "took longer"),
    "exponential macro": ("{% macro m(n) %}{% if n < 60 %}{{ m(n+1) }}{{ m(n+1) }}{% endif %}{% endmacro %}{{ m(0) }}",
                          "took longer"),
    "endless recursion": ("{% macro m(n) %}{{ m(n+1) }}{% endmacro %}{{ m(0) }}", "recursion too deep"),
    "recursive loop": ("{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}", "recursion too deep"),
    "string repeat": ("{{ 'a' * 10**9 }}", "'*' would make 1000000000"),
    "list repeat": ("{{ ([1] * 999999) * 999999 }}", "'*' would make 999998000001"),
    "power": ("{{ 2 ** (10**10) }}", "'**' makes too big an integer"),
    "integer squaring": ("{% set ns = namespace(x=10**1000) %}{% for i in range(99) %}{% set ns.x = ns.x * ns.x %}"
                         "{% endfor %}", "'*' makes too big an integer"),
    "doubling with ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                        "an operation would make 1048576"),
    "doubling with +": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                        "an operation would make 1048576"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "a format width"),
    "percent width": ("{{ '%999999999d' % 1 }}", "a % format width"),
    "format filter width": ("{{ '%.999999999f'|format(1) }}", "a % format width"),
    "ljust": ("{{ 'a'.ljust(10**9) }}", "str.ljust()"),
    "bytes ljust": ("{{ 'a'.encode().ljust(10**9) }}", "str.ljust()"),
    "expandtabs": ("{{ ('\t' * 999999).expandtabs(999999) }}", "expandtabs()"),
    "translate": ("{% set s = 'a' * 999999 %}{{ s.translate({97: s}) }}", "translate()"),
    "center": ("{{ 'a'|center(10**9) }}", "center would make"),
    "indent": ("{{ 'a'|indent(10**9, true) }}", "indent would make"),
    "replace": ("{% set s = 'a' * 999999 %}{{ s.replace('a', s) }}", "replace() would make 999998000001"),
    "replace filter": ("{% set s = 'a' * 999999 %}{{ s|replace('a', s) }}", "replace() would make 999998000001"),
    "join": ("{% set l = ['a'] * 999999 %}{{ l|join('b' * 999999) }}", "join would make 999998000001"),
    "str.join": ("{% set s = 'a' * 999999 %}{{ s.join([s, s]) }}", "join() would make 2999997"),
    "sum of lists": ("{% set l = [['a'] * 999999] * 999999 %}{{ l|sum(start=[])|length }}", "sum would make"),
    "batch fill": ("{{ [1]|batch(10**9, 'x')|list }}", "batch would make"),
    "slice filter": ("{{ [1]|slice(10**9)|list }}", "slice(1000000000) is over the limit"),
    "wordwrap": ("{% set s = 'a' * 999999 %}{{ s|wordwrap(1, true, s) }}", "wordwrap would make"),
    "escape chain": ("{{ ('&' * 999999)|e|e|e|e|length }}", "an operation would make 4999995"),
    "tojson indent": ("{{ messages|tojson(indent=10**9) }}", "tojson indent of 1000000000"),
    "set-block of one string": ("{% set s = 'a' * 500000 %}{% set x %}{% for i in range(100000) %}{{ s }}{% endfor %}"
                                "{% endset %}", "a macro or {% set %} block would make 1500000"),
    "macro of one string": ("{% set s = 'a' * 500000 %}{% macro m() %}{% for i in range(100000) %}{{ s }}{% endfor %}"
                            "{% endmacro %}{{ m() }}", "a macro or {% set %} block would make 1500000"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "the output is over the limit of 1000000"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused(name):
    source, problem = HOSTILE[name]
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    before = copy.deepcopy((chat, tools))
    started_s = time.monotonic()
    with pytest.raises(ChatTemplateError) as caught:
        ChatTemplate(source, "gguf", limits=RenderLimits(max_render_s=0.3)).render(chat, tools=tools)
    assert str(caught.value).startswith("gguf chat template")
    assert problem in str(caught.value)
    assert caught.value.reason in ("unsafe", "limit")
    assert time.monotonic() - started_s < 2.0
    assert (chat, tools) == before


def test_a_slow_template_runs_out_of_time_once():
    # the first capability probe stops it: neither the other probes nor the render run it again
    started_s = time.monotonic()
    with pytest.raises(ChatTemplateError, match="rendering took longer than 0.3 s") as caught:
        ChatTemplate(HOSTILE["nested loops"][0], "gguf", limits=RenderLimits(max_render_s=0.3)).render([])
    assert caught.value.reason == "limit"
    assert 0.3 <= time.monotonic() - started_s < 0.55


# Loops that keep what each pass builds: refused once memory has grown by the limit.
KEEPERS = {
    "kept strings": "{% set l = [] %}{% for i in range(100000) %}{% set _ = l.append('a' * 999999) %}{% endfor %}",
    "kept list copies": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['a' * 999999] %}"
                        "{% endfor %}",
    "kept slices": "{% set s = 'a' * 999999 %}{% set l = [] %}{% for i in range(100000) %}{% set _ = l.append(s[i:]) %}"
                   "{% endfor %}",
    "kept dicts": "{% set d = dict.fromkeys(range(100000)) %}{% set l = [] %}{% for i in range(100000) %}"
                  "{% set _ = l.append(d.copy()) %}{% endfor %}",
    "kept blocks": "{% set l = [] %}{% for i in range(100000) %}{% set x %}{{ 'a' * 999999 }}{% endset %}"
                   "{% set _ = l.append(x) %}{% endfor %}",
}
MEMORY_LIMITS = RenderLimits(memory_check_bytes=4_000_000, max_memory_growth_bytes=48_000_000)


@pytest.mark.parametrize("name", sorted(KEEPERS))
def test_memory_growth_is_bounded(name):
    with pytest.raises(ChatTemplateError, match=r"memory grew by \d+ MiB while rendering, over the limit of 45 MiB"):
        ChatTemplate(KEEPERS[name], "gguf", limits=MEMORY_LIMITS).render([])


def test_building_a_string_piece_by_piece_is_not_mistaken_for_growth():
    # 2000 pieces of 500 characters: about 1 GB of intermediate strings, each freed at once
    source = ("{% set ns = namespace(s='') %}{% for i in range(2000) %}{% set ns.s = ns.s ~ ('x' * 500) %}{% endfor %}"
              "{{ ns.s|length }}")
    assert ChatTemplate(source, "gguf", limits=MEMORY_LIMITS).render([]) == "1000000"


def test_harmless_leftovers_render_without_reaching_anything():
    assert render("{{ lipsum is defined }}") == "False"            # lipsum() can make megabytes; not offered
    assert render("{% set ns = namespace(a=1) %}{{ ns.__dict__ }}") == ""
    assert render("{% set l = [] %}{% set _ = l.append(1) %}{{ l }}") == "[1]"   # the template's own list


def test_oversized_template_source():
    with pytest.raises(ChatTemplateError, match="the template is 101 characters, over the limit of 100") as caught:
        ChatTemplate("x" * 101, "gguf", limits=RenderLimits(max_source_chars=100))
    assert caught.value.reason == "limit"


def test_output_limit_is_configurable():
    limits = RenderLimits(max_output_chars=10)
    assert render("{{ 'x' * 10 }}", limits=limits) == "x" * 10
    with pytest.raises(ChatTemplateError, match="the output is over the limit of 10 characters"):
        render("{{ 'x' * 10 }}y", limits=limits)


# ---- limits that hold inside one C call: the render runs in a worker process ----

QUADRATIC_SUM = "{{ ([[1]*10]*100000)|sum(start=[])|length }}"
# str() of a list nested by reference: 100 x 100 x 10,000 items, built in one C call
NESTED_STR = "{% set a = [1] * 10000 %}{% set b = [a] * 100 %}{% set c = [b] * 100 %}{{ c|string|length }}"


def test_sum_of_lists_is_linear_and_right():
    assert render("{{ ([[1, 2]] * 3)|sum(start=[0]) }}") == "[0, 1, 2, 1, 2, 1, 2]"
    assert render(QUADRATIC_SUM, limits=RenderLimits(max_render_s=5.0)) == "1000000"


def test_a_render_stuck_in_one_c_call_is_stopped_and_not_retried():
    template = ChatTemplate(NESTED_STR, "gguf", limits=RenderLimits(max_render_s=0.5, max_value_chars=10**9))
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "user", "content": "hi"}])
    assert info.value.reason == "limit" and "\n" not in str(info.value)
    with pytest.raises(ChatTemplateError) as again:      # one failure per template, not one per turn
        template.render([{"role": "user", "content": "hi"}])
    assert again.value is info.value
    # the worker was replaced: another template renders
    assert ChatTemplate("{{ messages[0].content }}", "gguf").render([{"role": "user", "content": "ok"}]) == "ok"


def test_the_calling_thread_keeps_running_while_a_template_renders():
    import threading
    import time
    template = ChatTemplate(NESTED_STR, "gguf", limits=RenderLimits(max_render_s=1.0, max_value_chars=10**9))
    worker = threading.Thread(target=lambda: pytest.raises(ChatTemplateError, template.render, []))
    worker.start()
    gaps, last = [], time.monotonic()
    while worker.is_alive():        # what a GUI thread does: short steps; the render must not hold the GIL
        time.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    worker.join()
    assert max(gaps) < 1.0          # a hang guard, not a speed test: a blocked thread waits the whole render


def test_builtin_templates_render_in_this_process():
    assert not ChatTemplate.builtin("chatml").isolated
    assert ChatTemplate("{{ 1 }}", "gguf").isolated
