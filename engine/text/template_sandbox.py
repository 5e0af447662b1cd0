"""The sandbox a chat template renders in: jinja2's immutable sandbox, HF's helpers, and render limits.

A GGUF is untrusted input, so its `tokenizer.chat_template` is rendered in jinja2's
`ImmutableSandboxedEnvironment` with the helpers Hugging Face templates expect, under limits on
time, sizes and memory growth: a hostile template can reach neither files, private attributes nor
the process, and cannot hang or exhaust memory. A code generator routes loops, buffers, `~` and
slices through checks; filters, operators and calls are size-checked; all of it spends the one
`_RenderBudget` that the render in progress set in `_BUDGET`.

It lives apart from engine.text.chat_template, which sets the budget and turns the errors raised here
into ChatTemplateError, because it knows nothing of conversations or template formats.
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
from typing import Any, Callable

import psutil
from jinja2 import filters as jinja_filters
from jinja2 import Undefined, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment, modifies_known_mutable


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
    if isinstance(start, (list, tuple)) and all(type(item) is type(start) for item in items):
        # `start + a + b + ...` copies the growing total at every step: quadratic, all inside one
        # C call that no time limit can stop. One pass gives the same list.
        total = list(start)
        for n, item in enumerate(items):
            if n % 1024 == 0:
                _tick()
            total.extend(item)
        return total if isinstance(start, list) else tuple(total)
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
