"""Chat templates: turn a conversation into the prompt text a model was trained on.

A GGUF's `tokenizer.chat_template` is Jinja written for Hugging Face transformers. A GGUF is
untrusted input, so the template is rendered in jinja2's `ImmutableSandboxedEnvironment` with
the helpers HF templates expect, under limits on time, sizes and memory growth: a hostile
template can reach neither files, private attributes nor the process, and cannot hang or
exhaust memory. A model without a template gets a built-in one (resources/chat_templates);
each built-in writes exactly the text of llama.cpp's formatter of the same name
(llm_chat_apply_template in llama.cpp's src/llama-chat.cpp).
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import psutil
from gguf.constants import Keys
from jinja2 import filters as jinja_filters
from jinja2 import Undefined, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment, modifies_known_mutable

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "resources" / "chat_templates"
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


@dataclass(frozen=True)
class RenderLimits:
    max_source_chars: int = 1_000_000     # real templates are under 50 kB
    max_output_chars: int = 1_000_000     # the rendered prompt
    max_value_chars: int = 1_000_000      # one string or list built by an operator, filter or call
    # A loop can keep what each pass builds, so memory is watched too: each time the render has
    # built another `memory_check_bytes` (rough bytes, garbage included, see `_built_bytes`), the
    # process's resident memory must not have grown by more than `max_memory_growth_bytes`.
    memory_check_bytes: int = 64_000_000
    max_memory_growth_bytes: int = 512_000_000
    max_int_bits: int = 65_536
    max_range_items: int = 100_000
    max_render_s: float = 5.0


class _RenderLimitError(Exception):
    pass


class _TemplateRaised(Exception):
    pass


class _RenderBudget:
    """What one render may still spend; active through `_BUDGET` while the render runs."""

    def __init__(self, limits: RenderLimits, inputs: Any):
        self.limits = limits
        self.deadline_s = time.monotonic() + limits.max_render_s
        self.built_bytes = 0
        self.next_memory_check_bytes = limits.memory_check_bytes
        self.start_rss_bytes = _rss_bytes()
        self.inputs = inputs                       # keeps the ids below valid
        self.input_container_ids = _container_ids(inputs)

    def tick(self) -> None:
        if time.monotonic() > self.deadline_s:
            raise _RenderLimitError(f"rendering took longer than {self.limits.max_render_s:g} s")

    def count_built(self, n_bytes: int) -> None:
        # Counting alone cannot tell kept values from garbage (templates that build a string piece
        # by piece make a lot of it), so past each step the resident memory is looked at.
        self.built_bytes += n_bytes
        if self.built_bytes < self.next_memory_check_bytes:
            return
        self.next_memory_check_bytes = self.built_bytes + self.limits.memory_check_bytes
        grown_bytes = _rss_bytes() - self.start_rss_bytes
        _require(grown_bytes <= self.limits.max_memory_growth_bytes,
                 f"memory grew by {grown_bytes >> 20} MiB while rendering, "
                 f"over the limit of {self.limits.max_memory_growth_bytes >> 20} MiB")


_BUDGET: contextvars.ContextVar[_RenderBudget | None] = contextvars.ContextVar("chat_template_budget", default=None)
DEFAULT_LIMITS = RenderLimits()
_PROCESS = psutil.Process()


def _rss_bytes() -> int:
    return _PROCESS.memory_info().rss


def _limits() -> RenderLimits:
    budget = _BUDGET.get()
    return budget.limits if budget else DEFAULT_LIMITS


def _container_ids(value: Any) -> set[int]:
    ids: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, dict)) and id(item) not in ids:
            ids.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return ids


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise _RenderLimitError(problem)


def _check_chars(n_chars: int, what: str) -> None:
    cap = _limits().max_value_chars
    _require(n_chars <= cap, f"{what} would make {n_chars} characters/items, over the limit of {cap}")


def _built_bytes(value: Any) -> int:
    """Rough bytes of a value just built: its characters, or 64 per item of a container (a new
    item is often a new small object, as from str.split)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, Mapping, set, frozenset)):
        return 64 * len(value)
    return 0


def _checked_size(value: Any) -> Any:
    """`value`, once it is known to be small enough; counts it against the render's budget."""
    if isinstance(value, (str, bytes, list, tuple)):
        _check_chars(len(value), "an operation")
    elif isinstance(value, int) and value.bit_length() > _limits().max_int_bits:
        raise _RenderLimitError(f"an integer of {value.bit_length()} bits is over the limit")
    budget = _BUDGET.get()
    if budget:
        budget.count_built(_built_bytes(value))
    return value


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int):
        _check_chars(width, what)


def _check_percent_format(fmt: str) -> None:
    for match in re.finditer(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?", fmt):
        for number in match.groups():
            _require(number != "*", "'*' widths in % formatting are not allowed")
            if number:
                _check_width(int(number), "a % format width")


def _check_format_string(fmt: str) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        _require("{" not in (spec or ""), "nested fields in a format spec are not allowed")
        for number in re.findall(r"\d+", spec or ""):
            _check_width(int(number), "a format width")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sized = (str, bytes, list, tuple)
    if operator == "*":
        if isinstance(left, sized) and isinstance(right, int):
            _check_chars(len(left) * right, "'*'")
        elif isinstance(right, sized) and isinstance(left, int):
            _check_chars(len(right) * left, "'*'")
        elif isinstance(left, int) and isinstance(right, int):
            _require(left.bit_length() + right.bit_length() <= _limits().max_int_bits, "'*' makes too big an integer")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _require(left.bit_length() * right <= _limits().max_int_bits, "'**' makes too big an integer")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left)


def _check_str_method(text: str | bytes, method: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse the str/bytes method calls whose result size an argument controls; may return new args."""
    if method in ("ljust", "rjust", "center", "zfill") and args:
        _check_width(args[0], f"str.{method}()")
    elif method == "expandtabs":
        tab_size = args[0] if args else kwargs.get("tabsize", 8)
        _check_chars(len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(tab_size, 0), "expandtabs()")
    elif method == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        n_hits = text.count(old) if old else len(text) + 1
        _check_chars(len(text) + n_hits * max(len(new) - len(old), 0), "replace()")
    elif method == "join" and args:
        items = list(args[0])
        _check_chars(sum(len(item) for item in items) + len(text) * max(len(items) - 1, 0), "join()")
        return (items,) + args[1:]
    elif method == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _check_chars(len(text) * longest, "translate()")
    return args


# ---- filters whose output size an argument controls, and the helpers HF templates use ----

def _items(environment, value: Any, attribute: Any) -> list:
    items = list(value)
    if attribute is not None:
        getter = jinja_filters.make_attrgetter(environment, attribute)
        items = [getter(item) for item in items]
    return items


@pass_eval_context
def _join_filter(eval_ctx, value: Any, d: str = "", attribute: Any = None) -> str:
    items = _items(eval_ctx.environment, value, attribute)
    _check_chars(sum(len(str(item)) for item in items) + len(str(d)) * max(len(items) - 1, 0), "join")
    return jinja_filters.sync_do_join(eval_ctx, items, d)


@pass_environment
def _sum_filter(environment, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    items = _items(environment, iterable, attribute)
    if isinstance(start, (str, list, tuple)):
        _check_chars(len(start) + sum(len(item) for item in items if isinstance(item, (str, list, tuple))), "sum")
    return jinja_filters.sync_do_sum(environment, items, start=start)


@pass_eval_context
def _replace_filter(eval_ctx, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _check_str_method(str(s), "replace", (str(old), str(new)), {})
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


def _center_filter(value: Any, width: int = 80) -> str:
    _check_width(width, "center")
    return str(value).center(width)


def _indent_filter(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    pad_chars = width if isinstance(width, int) else len(str(width))
    _check_chars(len(str(s)) + (str(s).count("\n") + 1) * pad_chars, "indent")
    return jinja_filters.do_indent(s, width, first, blank)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value))
    return jinja_filters.do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap_filter(environment, s: Any, width: int = 79, break_long_words: bool = True,
                     wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text, joint = str(s), wrapstring or environment.newline_sequence
    _check_chars(len(text) + (len(text) // max(width, 1) + text.count("\n") + 1) * len(joint), "wordwrap")
    return jinja_filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _batch_filter(value: Any, linecount: int, fill_with: Any = None) -> Any:
    _check_chars(linecount, "batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


@pass_eval_context
def _slice_filter(eval_ctx, value: Any, slices: int, fill_with: Any = None) -> Any:
    _require(slices <= _limits().max_range_items, f"slice({slices}) is over the limit")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


def _tojson_filter(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
    """HF's `tojson`: plain JSON (no HTML escaping) with json.dumps' own options."""
    indent_chars = len(indent) if isinstance(indent, str) else indent or 0
    _require(indent_chars <= 64, f"tojson indent of {indent_chars} is over 64")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)
    return _checked_size(text)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _bounded_range(*args: int) -> range:
    items = range(*args)
    cap = _limits().max_range_items
    try:
        n_items = len(items)
    except OverflowError:
        n_items = cap + 1
    _require(n_items <= cap, f"range() of {n_items} items is over the limit of {cap}")
    return items


def _size_checked(func: Callable) -> Callable:
    """A filter whose result is size-checked (|e makes five characters of one '&', chains multiply)."""
    @functools.wraps(func)      # keeps jinja's pass_context/pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        return _checked_size(func(*args, **kwargs))
    return checked


class _GenerationBlock(Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it only renders."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _OutputBuffer(list):
    """A frame buffer (macro, {% set %} block, caller): its text becomes one string, so it is
    held to the size of one value; writing it counts as building."""

    n_chars = 0

    def append(self, item: Any) -> None:
        n_chars = len(item) if isinstance(item, str) else len(str(item))
        self.n_chars += n_chars
        _check_chars(self.n_chars, "a macro or {% set %} block")
        budget = _BUDGET.get()
        if budget:
            budget.count_built(n_chars)
        super().append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles every for-loop through `guard_iterable`, every buffer as an `_OutputBuffer`, and
    every `~` and slice through `checked_size`."""

    def visit_Template(self, node, frame=None):
        for loop in node.find_all(nodes.For):
            guard = nodes.EnvironmentAttribute("guard_iterable", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.iter.lineno)
            loop.iter.set_environment(self.environment)
        super().visit_Template(node, frame)

    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_output_buffer()")

    def visit_Concat(self, node, frame):
        self.write("environment.checked_size(")
        super().visit_Concat(node, frame)
        self.write(")")

    def visit_Getitem(self, node, frame):
        if not isinstance(node.arg, nodes.Slice):     # jinja compiles slices to plain Python, and a slice is a copy
            return super().visit_Getitem(node, frame)
        self.write("environment.checked_size(")
        super().visit_Getitem(node, frame)
        self.write(")")


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """HF's chat-template environment (trim_blocks, lstrip_blocks, loop controls, HF helpers) with render limits."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _GuardedCodeGenerator

    def __init__(self, clock: Callable[[], datetime] = datetime.now):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
        self.globals.pop("lipsum", None)
        self.globals.update(range=_bounded_range, raise_exception=_raise_exception,
                            strftime_now=lambda fmt: clock().strftime(fmt))
        self.filters.update(tojson=_tojson_filter, from_json=json.loads, join=_join_filter, sum=_sum_filter,
                            replace=_replace_filter, center=_center_filter, indent=_indent_filter,
                            format=_format_filter, wordwrap=_wordwrap_filter, batch=_batch_filter,
                            slice=_slice_filter)
        self.filters = {name: _size_checked(func) for name, func in self.filters.items()}

    def get_template(self, *args: Any, **kwargs: Any):
        raise SecurityError("a chat template cannot include, import or extend other templates")

    select_template = get_or_select_template = get_template

    @staticmethod
    def checked_size(value: Any) -> Any:
        return _checked_size(value)

    @staticmethod
    def new_output_buffer() -> list:
        return _OutputBuffer()

    @staticmethod
    def guard_iterable(iterable: Any):
        budget = _BUDGET.get()
        for item in iterable:
            if budget:
                budget.tick()
            yield item

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # llama.cpp's template engine lets templates append to and pop from lists they built
        # themselves (Kimi-K2 does); the caller's messages and tools stay immutable.
        if not SandboxedEnvironment.is_safe_attribute(self, obj, attr, value):
            return False
        if not modifies_known_mutable(obj, attr):
            return True
        budget = _BUDGET.get()
        return (attr in ("append", "pop") and type(obj) is list and budget is not None
                and id(obj) not in budget.input_container_ids)

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format_string(value.__self__)
        return wrapped

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "+" and (isinstance(left, str) or isinstance(right, str)):
            # llama.cpp's template engine reads a missing value added to a string as '' (firefunction-v2 relies on it)
            left, right = ("" if _is_missing(left) else left), ("" if _is_missing(right) else right)
        _check_binop(operator, left, right)
        return _checked_size(self.binop_table[operator](left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's own calling convention
        _tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)) and callable(__obj):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return _checked_size(super().call(__context, __obj, *args, **kwargs))


def _is_missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget:
        budget.tick()


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
                 clock: Callable[[], datetime] = datetime.now):
        self.source = source
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self.limits = limits
        self.clock = clock
        self._context = dict(context or {})
        self._template = self._compile(source)
        self._tool_use = (ChatTemplate(tool_use_source, f"{name} tool_use", bos_token=bos_token, eos_token=eos_token,
                                       add_bos=add_bos, add_eos=add_eos, limits=limits, clock=clock)
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
        budget = _RenderBudget(self.limits, variables)
        token = _BUDGET.set(budget)
        try:
            parts, n_chars = [], 0
            for chunk in self._template.generate(variables):
                n_chars += len(chunk)
                _require(n_chars <= self.limits.max_output_chars,
                         f"the output is over the limit of {self.limits.max_output_chars} characters")
                parts.append(chunk)
            return "".join(parts)
        except Exception as error:
            failure = _template_error(self.name, error)
        finally:
            _BUDGET.reset(token)
        raise failure       # outside the except block: the template's frames and values are freed now

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
