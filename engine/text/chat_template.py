"""Chat templates: turn a conversation into the prompt text a model was trained on.

A GGUF's `tokenizer.chat_template` is Jinja written for Hugging Face transformers. A GGUF is
untrusted input, so the template is rendered in the sandbox of engine.text.template_sandbox (jinja2's
`ImmutableSandboxedEnvironment` with HF's helpers, under limits on time, sizes and memory growth).
This module compiles and renders templates there, reshapes messages as llama.cpp does before it
renders, and chooses a template for a model. A model without a template gets a built-in one
(resources/chat_templates); each built-in writes exactly the text of llama.cpp's formatter of the
same name (llm_chat_apply_template in llama.cpp's src/llama-chat.cpp).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from gguf.constants import Keys
from jinja2.exceptions import SecurityError, TemplateSyntaxError

from engine.text.render_process import WORKER, RenderFailed, RenderTimeout
from engine.text.template_sandbox import (DEFAULT_LIMITS, RenderLimits, TemplateSandbox, _BUDGET, _RenderBudget,
                                          _RenderLimitError, _require, _TemplateRaised)

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "resources" / "chat_templates"
TEMPLATE_FILENAME = "<template>"      # the file name jinja gives compiled template code


class ChatTemplateError(Exception):
    """A chat template that cannot be compiled or rendered; says which template and why.

    `reason` sorts the cause: "raised" (the template's raise_exception), "syntax", "unsafe"
    (the sandbox refused an operation), "limit" (time, size or recursion limit), "error".
    """

    def __init__(self, template_name: str, problem: str, line: int | None = None, reason: str = "error"):
        self.template_name = template_name
        self.problem = problem
        self.line = line
        self.reason = reason
        where = f", line {line}" if line else ""
        super().__init__(f"{template_name} chat template{where}: {problem}")


# ---- messages: the shapes a template accepts ----

PROBE_TEXT = "chat-template-probe-6d1f"
PROBE_SYSTEM_TEXT = "chat-template-probe-system-93ab"


def _plain(value: Any) -> Any:
    """A private JSON-like copy, so that nothing the caller owns reaches the template."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    raise TypeError(f"chat messages and tools must be JSON-like data, not {type(value).__name__}")


def _text_of(content: Any) -> Any:
    """Typed content parts joined into one string, as llama.cpp's concat_content_parts does."""
    if not isinstance(content, list):
        return content
    texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return "\n".join(str(text) for text in texts)


@dataclass(frozen=True)
class _Capabilities:
    string_content: bool
    typed_content: bool
    system_role: bool


def _reshape_content(message: dict, caps: _Capabilities) -> dict:
    content = message.get("content")
    # System text goes as a string wherever strings are read: some templates that read the parts
    # of user turns print a system message's content whole (Gemma 4).
    as_text = not caps.typed_content or (caps.string_content and message.get("role") == "system")
    if isinstance(content, list) and as_text:
        return {**message, "content": _text_of(content)}
    if isinstance(content, str) and caps.typed_content and not caps.string_content:
        return {**message, "content": [{"type": "text", "text": content}]}
    return message


def _merge_system_into_first_turn(messages: list[dict]) -> list[dict]:
    # llama.cpp's workaround::system_message_not_supported
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) == 1:
        return []
    system, first = messages[0], messages[1]
    merged = f"{_text_of(system.get('content')) or ''}\n{_text_of(first.get('content')) or ''}"
    return [{**first, "content": merged}] + messages[2:]


# ---- the template ----

def _generate(template, name: str, variables: dict[str, Any], limits: RenderLimits) -> str:
    """Render a compiled template under `limits`, in this process."""
    budget = _RenderBudget(limits, variables)
    token = _BUDGET.set(budget)
    try:
        parts, n_chars = [], 0
        for chunk in template.generate(variables):
            n_chars += len(chunk)
            _require(n_chars <= limits.max_output_chars,
                     f"the output is over the limit of {limits.max_output_chars} characters")
            parts.append(chunk)
        return "".join(parts)
    except Exception as error:
        failure = _template_error(name, error)
    finally:
        _BUDGET.reset(token)
    raise failure       # outside the except block: the template's frames and values are freed now


_WORKER_NOW = [datetime.now()]          # the time of the render in progress, for `strftime_now`
_WORKER_TEMPLATES: dict[str, Any] = {}  # compiled sources, in the render worker
MAX_WORKER_TEMPLATES = 8


def render_in_this_process(source: str, name: str, variables: dict[str, Any], limits: RenderLimits,
                           now: datetime) -> tuple:
    """The render worker's side (engine.text.render_process): ("ok", text) or ("error", reason, problem, line)."""
    _WORKER_NOW[0] = now
    try:
        template = _WORKER_TEMPLATES.get(source)
        if template is None:
            if len(_WORKER_TEMPLATES) >= MAX_WORKER_TEMPLATES:
                _WORKER_TEMPLATES.clear()
            template = _WORKER_TEMPLATES[source] = TemplateSandbox(lambda: _WORKER_NOW[0]).from_string(source)
        return ("ok", _generate(template, name, variables, limits))
    except ChatTemplateError as error:
        return ("error", error.reason, error.problem, error.line)
    except Exception as error:      # a syntax error: the caller compiled it too, so this is rare
        failure = _template_error(name, error)
        return ("error", failure.reason, failure.problem, failure.line)

def _error_line(error: BaseException) -> int | None:
    if isinstance(error, TemplateSyntaxError):
        return error.lineno
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _template_error(template_name: str, error: Exception) -> ChatTemplateError:
    if isinstance(error, _TemplateRaised):
        reason, problem = "raised", f"the template raised an error: {error}"
    elif isinstance(error, TemplateSyntaxError):
        reason, problem = "syntax", f"syntax error: {error.message}"
    elif isinstance(error, SecurityError):
        reason, problem = "unsafe", f"unsafe operation refused: {error}"
    elif isinstance(error, _RenderLimitError):
        reason, problem = "limit", f"render limit reached: {error}"
    elif isinstance(error, RecursionError):
        reason, problem = "limit", "render limit reached: recursion too deep"
    elif isinstance(error, MemoryError):
        reason, problem = "limit", "render limit reached: out of memory"
    else:
        reason, problem = "error", f"{type(error).__name__}: {error}"
    return ChatTemplateError(template_name, problem, _error_line(error), reason)


class ChatTemplate:
    """One chat template, compiled once, rendered per conversation."""

    def __init__(self, source: str, name: str, *, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False, add_eos: bool = False, context: Mapping[str, Any] | None = None,
                 tool_use_source: str | None = None, limits: RenderLimits = DEFAULT_LIMITS,
                 clock: Callable[[], datetime] = datetime.now, isolated: bool | None = None):
        self.source = source
        # a template from a file renders in the worker process, where a limit can stop it; our
        # own built-ins render here
        self.isolated = "builtin_template_name" not in (context or {}) if isolated is None else isolated
        self._limit_error: ChatTemplateError | None = None
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self.limits = limits
        self.clock = clock
        self._context = dict(context or {})
        self._template = self._compile(source)
        self._tool_use = (ChatTemplate(tool_use_source, f"{name} tool_use", bos_token=bos_token, eos_token=eos_token,
                                       add_bos=add_bos, add_eos=add_eos, limits=limits, clock=clock,
                                       isolated=self.isolated)
                          if tool_use_source else None)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], architecture: str, **options: Any) -> ChatTemplate:
        """The GGUF's own template; without one, the built-in for the model (see `builtin_name_for_model`)."""
        tokens = md.get(Keys.Tokenizer.LIST) or []
        special = dict(bos_token=_token_text(tokens, md.get(Keys.Tokenizer.BOS_ID)),
                       eos_token=_token_text(tokens, md.get(Keys.Tokenizer.EOS_ID)),
                       add_bos=bool(md.get(Keys.Tokenizer.ADD_BOS, False)),
                       add_eos=bool(md.get(Keys.Tokenizer.ADD_EOS, False)))
        source = md.get(Keys.Tokenizer.CHAT_TEMPLATE) or ""
        tool_use = md.get(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="tool_use")) or None
        for key, value in ((Keys.Tokenizer.CHAT_TEMPLATE, source), ("tool_use template", tool_use)):
            if value is not None and not isinstance(value, str):
                raise ChatTemplateError("gguf", f"{key} must be text, not {type(value).__name__}", reason="syntax")
        if source.strip() in BUILTIN_TEMPLATES:
            return cls.builtin(source.strip(), **special, **options)
        if source:
            return cls(source, "gguf", tool_use_source=tool_use, **special, **options)
        if tool_use:       # as llama.cpp's common_chat_templates_init does
            return cls(tool_use, "gguf", **special, **options)
        return cls.builtin(builtin_name_for_model(md, architecture), **special, **options)

    @classmethod
    def builtin(cls, builtin_name: str, **options: Any) -> ChatTemplate:
        try:
            file_stem = BUILTIN_TEMPLATES[builtin_name]
        except KeyError:
            raise ChatTemplateError(f"built-in {builtin_name}", "no such built-in template; available: "
                                    + ", ".join(sorted(BUILTIN_TEMPLATES))) from None
        source = (BUILTIN_DIR / f"{file_stem}.jinja").read_text(encoding="utf-8")
        return cls(source, f"built-in {builtin_name}", context={"builtin_template_name": builtin_name}, **options)

    def render(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[Mapping[str, Any]] | None = None, **flags: Any) -> str:
        """The template's text for `messages` (role/content dicts; content a string or typed parts).

        `flags` reach the template as variables: enable_thinking, reasoning_effort, date_string...
        """
        if tools and self._tool_use is not None:
            return self._tool_use.render(messages, add_generation_prompt, tools, **flags)
        return self._render(self._prepare(_plain(list(messages))), add_generation_prompt, _plain(tools), flags)

    def render_prompt(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                      tools: list[Mapping[str, Any]] | None = None, **flags: Any) -> str:
        """`render`, less a leading BOS (trailing EOS) text that the tokenizer adds itself.

        Matches llama.cpp's common_chat_template_direct_apply, so that the prompt gets one BOS.
        """
        text = self.render(messages, add_generation_prompt, tools, **flags)
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text

    def _compile(self, source: str):
        if len(source) > self.limits.max_source_chars:
            raise ChatTemplateError(self.name, f"the template is {len(source)} characters, "
                                    f"over the limit of {self.limits.max_source_chars}", reason="limit")
        try:
            return TemplateSandbox(self.clock).from_string(source)
        except Exception as error:
            failure = _template_error(self.name, error)
        raise failure       # outside the except block, so that it holds no traceback of the template

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: Any, flags: Mapping[str, Any]) -> str:
        if self._limit_error is not None:       # a template that hit a limit once is not tried again
            raise self._limit_error
        try:
            return self._render_once(messages, add_generation_prompt, tools, flags)
        except ChatTemplateError as error:
            if error.reason == "limit":
                self._limit_error = error
            raise

    def _render_once(self, messages: list[dict], add_generation_prompt: bool, tools: Any,
                     flags: Mapping[str, Any]) -> str:
        now = self.clock()
        # As llama.cpp's common_chat_template_direct_apply: `tools` only when there are some
        # (tool-use templates loop over it unguarded), enable_thinking on unless a flag says
        # otherwise, the date as `date_string` and `datetime`.
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "enable_thinking": True,
                     "date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y"),
                     **self._context, **_plain(dict(flags)),
                     "messages": messages, "add_generation_prompt": bool(add_generation_prompt)}
        if tools:
            variables["tools"] = tools
        if not self.isolated:
            return _generate(self._template, self.name, variables, self.limits)
        try:
            return WORKER.render(self.source, self.name, variables, self.limits, now)
        except RenderTimeout as e:
            raise ChatTemplateError(self.name, f"render limit reached: {e}", reason="limit") from None
        except RenderFailed as e:
            raise ChatTemplateError(self.name, e.problem, e.line, e.reason) from None

    def _prepare(self, messages: list[dict]) -> list[dict]:
        """Messages reshaped as llama.cpp does before it renders a template (common_chat_templates_apply_jinja)."""
        if "<|channel|>" not in self.source:      # every template but gpt-oss's knows no developer role
            messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        if not self._capabilities.system_role:
            messages = _merge_system_into_first_turn(messages)
        return [_reshape_content(message, self._capabilities) for message in messages]

    @cached_property
    def _capabilities(self) -> _Capabilities:
        """What the template does with typed content and a system message, found by rendering probes.

        Built-ins take string contents and place system text themselves, as llama.cpp's formatters do.
        """
        if "builtin_template_name" in self._context:
            return _Capabilities(string_content=True, typed_content=False, system_role=True)

        def shows(messages: list[dict], text: str) -> bool:
            try:
                out = self._render(messages, True, None, {})
            except ChatTemplateError as error:
                if error.reason == "limit":    # a template too slow or too big for a probe is no use at all
                    raise
                return False
            # a template that prints a content list whole (str or tojson) does not read its parts
            return text in out and f"'text': '{text}'" not in out and f'"text": "{text}"' not in out

        typed = [{"type": "text", "text": PROBE_TEXT}]
        string_content = shows([{"role": "user", "content": PROBE_TEXT}], PROBE_TEXT)
        typed_content = shows([{"role": "user", "content": typed}], PROBE_TEXT)
        if not (string_content or typed_content):     # the probes tell nothing: leave messages alone
            return _Capabilities(string_content=True, typed_content=True, system_role=True)
        system = [{"type": "text", "text": PROBE_SYSTEM_TEXT}] if typed_content and not string_content else PROBE_SYSTEM_TEXT
        user = typed if typed_content and not string_content else PROBE_TEXT
        system_role = shows([{"role": "system", "content": system}, {"role": "user", "content": user}], PROBE_SYSTEM_TEXT)
        return _Capabilities(string_content, typed_content, system_role)


def _token_text(tokens: list[str], token_id: Any) -> str:
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return str(tokens[token_id])
    return ""


# ---- built-in templates and how one is chosen ----

def _builtin_templates() -> dict[str, str]:
    """Built-in name (llama.cpp's) -> file stem; variants share a file and read `builtin_template_name`."""
    shared = {"llama2-sys": "llama2", "llama2-sys-bos": "llama2", "llama2-sys-strip": "llama2",
              "mistral-v1": "mistral-v3", "mistral-v3-tekken": "mistral-v3", "mistral-v7-tekken": "mistral-v7",
              "vicuna-orca": "vicuna", "exaone4": "exaone3", "granite-4.0": "granite", "granite-4.1": "granite",
              "bailing-think": "bailing", "chatglm3": "chatglm4"}
    own = {path.stem: path.stem for path in BUILTIN_DIR.glob("*.jinja")}
    return {**own, **shared}


BUILTIN_TEMPLATES: dict[str, str] = _builtin_templates()

# llm_chat_detect_template's checks flattened into one ordered table: the first rule whose
# substrings all occur names the template. The [INST] family is decided in `_detect_inst_family`.
_DETECT_BEFORE_INST = (
    ("phi4", ("<|im_start|>", "<|im_sep|>")),
    ("smolvlm", ("<|im_start|>", "<end_of_utterance>")),
    ("chatml", ("<|im_start|>",)),
)
_DETECT_AFTER_INST = (
    ("phi3", ("<|assistant|>", "<|end|>")),
    ("chatglm4", ("[gMASK]<sop>",)),
    ("exaone-moe", ("<|assistant|>", "<|user|>", "<|tool_declare|>")),
    ("falcon3", ("<|assistant|>", "<|user|>", "</s>")),
    ("glmedge", ("<|assistant|>", "<|user|>")),
    ("glmedge", ("<|{{ item['role'] }}|>", "<|begin_of_image|>")),
    ("zephyr", ("<|user|>", "<|endoftext|>")),
    ("monarch", ("bos_token + message['role']",)),
    ("gemma", ("<start_of_turn>",)),
    ("orion", ("'\\n\\nAssistant: ' + eos_token",)),
    ("openchat", ("GPT4 Correct ",)),
    ("vicuna-orca", ("USER: ", "ASSISTANT: ", "SYSTEM: ")),
    ("vicuna", ("USER: ", "ASSISTANT: ")),
    ("deepseek", ("### Instruction:", "<|EOT|>")),
    ("command-r", ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>")),
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>")),
    ("chatglm3", ("[gMASK]sop",)),
    ("minicpm", ("<用户>",)),
    ("deepseek2", ("'Assistant: ' + message['content'] + eos_token",)),
    ("deepseek3", ("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>")),
    ("exaone4", ("[|system|]", "[|assistant|]", "[|endofturn|]", "[|tool|]")),
    ("exaone3", ("[|system|]", "[|assistant|]", "[|endofturn|]")),
    ("rwkv-world", ("rwkv-world",)),
    ("rwkv-world", ("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}",)),
    ("granite-4.0", ("<|start_of_role|>", "<tool_call>", "g4_default_system_message")),
    ("granite-4.0", ("<|start_of_role|>", "<tools>", "g4_default_system_message")),
    ("granite-4.1", ("<|start_of_role|>", "<tool_call>")),
    ("granite-4.1", ("<|start_of_role|>", "<tools>")),
    ("granite", ("<|start_of_role|>",)),
    ("gigachat", ("message['role'] + additional_special_tokens[0] + message['content'] + additional_special_tokens[1]",)),
    ("megrez", ("<|role_start|>",)),
    ("yandex", (" Ассистент:",)),
    ("bailing", ("<role>ASSISTANT</role>", "'HUMAN'")),
    ("bailing-think", ("<role>ASSISTANT</role>", '"HUMAN"', "<think>")),
    ("bailing2", ("<role>ASSISTANT</role>", "<role>HUMAN</role>", "<|role_end|>")),
    ("llama4", ("<|header_start|>", "<|header_end|>")),
    ("dots1", ("<|endofuserprompt|>",)),
    ("hunyuan-moe", ("<|extra_0|>", "<|extra_4|>")),
    ("gpt-oss", ("<|start|>", "<|channel|>")),
    ("hunyuan-vl", ("<｜hy_Assistant｜>", "<｜hy_begin▁of▁sentence｜>")),
    ("hunyuan-dense", ("<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁3｜>")),
    ("kimi-k2", ("<|im_assistant|>assistant<|im_middle|>",)),
    ("seed_oss", ("<seed:bos>",)),
    ("grok-2", ("'Assistant: '  + message['content'] + '<|separator|>",)),
    ("pangu-embedded", ("[unused9]系统：[unused10]",)),
    ("solar-open", ("<|begin|>", "<|end|>", "<|content|>")),
)


def _first_match(source: str, rules: tuple) -> str | None:
    return next((name for name, needles in rules if all(needle in source for needle in needles)), None)


def _detect_inst_family(source: str) -> str | None:
    if not (source.startswith("mistral") or "[INST]" in source):
        return None
    if "[SYSTEM_PROMPT]" in source:
        return "mistral-v7"
    if "' [INST] ' + system_message" in source or "[AVAILABLE_TOOLS]" in source:
        if " [INST]" in source:
            return "mistral-v1"
        return "mistral-v3-tekken" if '"[INST]"' in source else "mistral-v3"
    if "content.strip()" in source:
        return "llama2-sys-strip"
    if "bos_token + '[INST]" in source:
        return "llama2-sys-bos"
    return "llama2-sys" if "<<SYS>>" in source else "llama2"


def detect_builtin_name(source: str) -> str | None:
    """The built-in whose format a template source (or a built-in's name) is, by llama.cpp's
    llm_chat_detect_template rules; None when none is recognised."""
    if source in BUILTIN_TEMPLATES:
        return source
    return (_first_match(source, _DETECT_BEFORE_INST) or _detect_inst_family(source)
            or _first_match(source, _DETECT_AFTER_INST))


# A vocabulary's own turn markers name its format; checked in order.
_VOCAB_MARKERS = (
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
    ("llama4", ("<|header_start|>", "<|eot|>")),
    ("deepseek3", ("<｜User｜>", "<｜Assistant｜>")),
    ("mistral-v7", ("[SYSTEM_PROMPT]", "[INST]")),
    ("mistral-v3", ("[INST]", "[/INST]")),
    ("command-r", ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>")),
    ("granite", ("<|start_of_role|>", "<|end_of_role|>")),
    ("gpt-oss", ("<|start|>", "<|channel|>")),
    ("kimi-k2", ("<|im_user|>", "<|im_middle|>")),
    ("seed_oss", ("<seed:bos>", "<seed:eos>")),
    ("phi3", ("<|user|>", "<|end|>")),
)

# Formats by `general.architecture` when the vocabulary has no turn markers.
FAMILY_TEMPLATES = {
    "llama": "llama2", "llama4": "llama4", "deepseek": "deepseek2", "deepseek2": "deepseek2",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen": "chatml", "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "phi3": "phi3", "command-r": "command-r", "cohere2": "command-r", "granite": "granite",
    "granitemoe": "granite", "gpt-oss": "gpt-oss", "exaone": "exaone3", "exaone4": "exaone4",
    "chatglm": "chatglm4", "rwkv6": "rwkv-world", "rwkv7": "rwkv-world", "seed_oss": "seed_oss",
}


def builtin_name_for_model(md: Mapping[str, Any], architecture: str) -> str:
    """The built-in for a GGUF without a chat template.

    llama.cpp itself falls back to chatml, except for 40-layer tekken models (Mistral Small 2503),
    which get mistral-v7-tekken (llama_model_chat_template). We keep that rule, then let the
    vocabulary's turn-marker tokens name the format, then the architecture family, then chatml.
    """
    tekken = md.get(Keys.Tokenizer.PRE) == "tekken"
    if tekken and md.get(Keys.LLM.BLOCK_COUNT.format(arch=architecture)) == 40:
        return "mistral-v7-tekken"
    vocab = set(md.get(Keys.Tokenizer.LIST) or ())
    name = next((name for name, markers in _VOCAB_MARKERS if all(marker in vocab for marker in markers)), None)
    name = name or FAMILY_TEMPLATES.get(architecture, "chatml")
    return f"{name}-tekken" if tekken and name in ("mistral-v3", "mistral-v7") else name
