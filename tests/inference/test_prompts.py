"""Chat messages -> prompt text (``inference.prompts``): validation, the plain template, a tokenizer's chat template."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.errors import InvalidRequest
from inference.prompts import PLAIN_CUE, ROLES, Message, chat_prompt, messages_parse, plain_prompt


def test_plain_template_is_one_line_per_message_ending_with_the_assistant_cue():
    messages = messages_parse(
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why?"},
        ]
    )
    assert plain_prompt(messages) == "System: Be terse.\nUser: Hi\nAssistant: Hello.\nUser: Why?\nAssistant:"


def test_a_tokenizer_without_a_chat_template_gets_the_plain_template():
    class NoTemplate:
        chat_template = None

    messages = [Message("user", "Hi")]
    assert chat_prompt(NoTemplate(), messages) == "User: Hi\nAssistant:"


def test_developer_messages_are_rendered_as_system():
    assert messages_parse([{"role": "developer", "content": "Rules."}]) == [Message("system", "Rules.")]


def test_text_parts_are_joined_and_extra_keys_ignored():
    parsed = messages_parse(
        [{"role": "user", "name": "ann", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    )
    assert parsed == [Message("user", "one\ntwo")]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        pytest.param([], "messages", id="empty"),
        pytest.param({"role": "user"}, "messages", id="not-a-list"),
        pytest.param(["hi"], "messages[0]", id="not-an-object"),
        pytest.param([{"content": "hi"}], "messages[0].role", id="no-role"),
        pytest.param([{"role": "function", "content": "hi"}], "messages[0].role", id="unknown-role"),
        pytest.param([{"role": ["user"], "content": "hi"}], "messages[0].role", id="role-not-a-string"),
        pytest.param([{"role": "user"}], "messages[0].content", id="no-content"),
        pytest.param([{"role": "user", "content": None}], "messages[0].content", id="null-content"),
        pytest.param([{"role": "user", "content": []}], "messages[0].content", id="no-parts"),
        pytest.param([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]", id="part-no-text"),
        pytest.param(
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "input_audio"}]}],
            "messages[1].content[0]",
            id="audio-part",
        ),
    ],
)
def test_invalid_messages_are_refused_naming_the_offending_param(raw, param):
    with pytest.raises(InvalidRequest) as info:
        messages_parse(raw)
    assert info.value.param == param and info.value.status == 400


@given(st.lists(st.tuples(st.sampled_from(ROLES), st.text()), min_size=1, max_size=6))
def test_any_valid_conversation_renders_ending_with_the_cue(pairs):
    messages = messages_parse([{"role": role, "content": content} for role, content in pairs])
    prompt = plain_prompt(messages)
    assert prompt.endswith("\n" + PLAIN_CUE) and all(m.content in prompt for m in messages)


# a real tokenizer with a chat template ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from speculative.pair import DEMO_VERIFIER

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEMO_VERIFIER))
    tokenizer.chat_template = (
        "{% for m in messages %}"
        "{% if m.role == 'tool' %}{{ raise_exception('this template has no tool role') }}{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def test_a_tokenizer_chat_template_is_applied_with_the_generation_prompt(tokenizer):
    messages = messages_parse([{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert chat_prompt(tokenizer, messages) == "<|system|>Be terse.\n<|user|>Hi\n<|assistant|>"


def test_a_chat_template_that_refuses_the_messages_is_a_400(tokenizer):
    with pytest.raises(InvalidRequest, match="no tool role") as info:
        chat_prompt(tokenizer, messages_parse([{"role": "tool", "content": "42"}]))
    assert info.value.param == "messages"
