"""A GGUF's chat template applied to chat messages, as llama.cpp's Python binding does.

``tokenizer.chat_template`` is Jinja (the Hugging Face convention). llama-cpp-python renders
it in a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension and a pass-through ``{% generation %}`` tag, and the variables
``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt`` and
``raise_exception``; the text is then tokenized with special tokens parsed and no BOS added
(the template writes it). This module renders the same text.

The template comes from a GGUF someone added to the mesh: it is data, not code. The
sandbox (no attribute access to internals, immutable containers) is bounded further here:
``range``, every ``for`` loop's items and string repetition have budgets, and the output is
capped, so a hostile template cannot spin or grow the node.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .errors import ModelError
from .shards import ChatInfo

__all__ = [
    "ChatTemplateError",
    "FALLBACK_TEMPLATE",
    "MAX_MESSAGES",
    "MAX_RENDERED",
    "render_chat",
    "render_messages",
]

MAX_RENDERED = 1 << 20  # the prompt cap of the API
MAX_MESSAGES = 1024
_MAX_ITERATIONS = 100_000  # every range() of one render together
# Every item every ``for`` of one render takes: nested loops over long strings or lists
# (``'x' * 65536``) ran for days in the sandbox before this bound.
_MAX_LOOP_ITEMS = 200_000
_LOOP_BUDGET = "_em_loop_items"  # the compiled templates' name of the loop budget
_MAX_SECONDS = 2.0  # one render's wall clock (real templates take milliseconds)
_render = threading.local()  # the budget of the render running on this thread
_MAX_REPEAT = 1 << 16  # a string or list repeated by "*" at most this long
_WIDE_BRACE = re.compile(r"\{[^}]*:[^}]*\d{6,}")  # "{0:>999999999}".format(x)
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|\d{6,})")  # "%1000000000s" % x


class ChatTemplateError(ModelError):
    """The chat template failed, refused the messages (``raise_exception``) or overran a
    bound."""


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            """Every ``for`` iterates through the render's loop budget. The budget is an
            internal name of the compiled code, which no template can assign or shadow."""
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(jinja2.nodes.For):
                # InternalName refuses construction (the parser makes them): built bare
                budget = object.__new__(jinja2.nodes.InternalName)
                budget.name, budget.lineno, budget.environment = _LOOP_BUDGET, loop.lineno, self
                call = jinja2.nodes.Call(budget, [loop.iter], [], None, None, lineno=loop.lineno)
                loop.iter = call.set_environment(self)
            return tree

        def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
            _check_deadline()
            if operator_ == "**":
                if isinstance(right, int | float) and abs(right) > 64:
                    raise ChatTemplateError("chat template: exponent too large")
                return operator.pow(left, right)
            if operator_ == "%":
                if isinstance(left, str) and _WIDE_FORMAT.search(left):
                    raise ChatTemplateError("chat template: format width too large")
                out = operator.mod(left, right)
                _check_size(out)
                return out
            if operator_ == "+":
                out = operator.add(left, right)
                _check_size(out)
                return out
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    if len(seq) * max(n, 0) > _MAX_REPEAT:
                        raise ChatTemplateError("chat template: repetition too long")
            return operator.mul(left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_args(args, kwargs)
            _check_deadline()
            if isinstance(__obj, jinja2.runtime.LoopContext) and args:
                # a recursive loop's loop(x): its items count like the first iterable's
                args = (_loop_items(args[0]), *args[1:])
            # the sandbox wraps str.format (functools.wraps: the bound method is __wrapped__)
            fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(fmt, str) and _WIDE_BRACE.search(fmt):
                raise ChatTemplateError("chat template: format width too large")
            out = super().call(__context, __obj, *args, **kwargs)
            _check_size(out)
            return out

    env = Bounded(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    # Filters are called directly by the compiled template, not through the sandbox.
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    return env


def _bounded_filter(f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja_pass_arg: context/environment filters stay so
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[1:], kwargs)
        _check_deadline()
        out = f(*args, **kwargs)
        _check_size(out)
        return out

    return bounded


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Calls from a template never need big numbers: a width of 10**9 to ``center``,
    ``ljust``, ``indent`` or ``zfill`` would allocate a gigabyte before any check."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_REPEAT:
            raise ChatTemplateError("chat template: argument too large")


def _check_size(out: Any) -> None:
    if isinstance(out, str | list | tuple) and len(out) > MAX_RENDERED:
        raise ChatTemplateError(f"chat template: a value over {MAX_RENDERED} long")


def _bounded_join(seq: Any) -> str:
    """Jinja's ``~`` (``str_join``), with the result's size capped."""
    out = "".join(str(x) for x in seq)
    _check_size(out)
    return out


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """A template compiled once (a model's template is rendered for every chat request);
    its renders share nothing but the code, so threads may render it at once."""
    compiled = _environment().from_string(template)
    # "~" compiles to the module-level str_join/markup_join: capped like "+" is.
    namespace = compiled.root_render_func.__globals__
    namespace["str_join"] = _bounded_join
    namespace["markup_join"] = _bounded_join
    namespace[_LOOP_BUDGET] = _loop_items
    return compiled


def _loop_items(seq: Any) -> Any:
    """A ``for`` loop's items, each counted against this thread's render's budget."""
    for item in seq:
        _render.loop_items -= 1
        if _render.loop_items < 0:
            raise ChatTemplateError("chat template: loops too long")
        _check_deadline()
        yield item


def _check_deadline() -> None:
    """Each loop item and call checks the render's clock: counted items may each do work
    that is not counted (a filter over a 64 KiB string), and that work must end too."""
    if time.monotonic() > _render.deadline:
        raise ChatTemplateError(f"chat template: rendering took over {_MAX_SECONDS} s")


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages`` under ``template`` (blocking: run it off the loop)."""
    import jinja2

    if len(messages) > MAX_MESSAGES:
        raise ChatTemplateError(f"more than {MAX_MESSAGES} messages")
    budget = [_MAX_ITERATIONS]

    def bounded_range(*args: int) -> range:
        r = range(*args)
        budget[0] -= len(r)
        if budget[0] < 0:
            raise ChatTemplateError("chat template: loops too long")
        return r

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the messages: {message}"[:500])

    _render.loop_items = _MAX_LOOP_ITEMS
    _render.deadline = time.monotonic() + _MAX_SECONDS
    try:
        compiled = _compiled(template)
        out: list[str] = []
        size = 0
        for piece in compiled.generate(
            range=bounded_range,  # this render's budget: shadows the environment's range
            messages=[dict(m) for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            raise_exception=raise_exception,
            strftime_now=lambda f: datetime.now().strftime(str(f)[:64]),
        ):
            size += len(piece)
            if size > MAX_RENDERED:
                raise ChatTemplateError(f"chat template rendered over {MAX_RENDERED} bytes")
            out.append(piece)
        return "".join(out)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ChatTemplateError(
            f"the chat template failed: {type(exc).__name__}: {exc}"[:500]
        ) from None
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply") from None


# llama-server's default where a GGUF has none (ChatML): said in the reply, never silent
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# A GGUF without a template whose architecture has one fixed chat format (Gemma's turns; its
# models were trained on nothing else, and ChatML gives them garbage): that format, said in
# the reply as "built-in". A system message goes before the first user turn, as Gemma's own
# template puts it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.sys = ns.sys + m['content'] + '\n\n' %}{% endif %}{% endfor %}"
    "{% set ns.first = true %}{% for m in messages %}{% if m['role'] != 'system' %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{% if ns.first and role == 'user' %}{{ ns.sys }}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% set ns.first = false %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BUILT_IN = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def render_messages(
    chat: ChatInfo | None, messages: Sequence[dict[str, Any]], architecture: str = ""
) -> tuple[str, str]:
    """The prompt for ``messages`` (blocking) and which template made it: "model" (the
    GGUF's own), "built-in" (its architecture's fixed format) or "chatml fallback"."""
    bos = chat.bos_token if chat is not None else ""
    eos = chat.eos_token if chat is not None else ""
    if chat is not None and chat.template:
        return render_chat(chat.template, messages, bos_token=bos, eos_token=eos), "model"
    built_in = BUILT_IN.get(architecture)
    if built_in is not None:
        return render_chat(built_in, messages, bos_token=bos, eos_token=eos), "built-in"
    return render_chat(FALLBACK_TEMPLATE, messages, bos_token="", eos_token=""), "chatml fallback"
