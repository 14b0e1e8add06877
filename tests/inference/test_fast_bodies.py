"""The fast path of body validation accepts only what the serializers accept, with the same result."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import serializers

from inference import fast_bodies
from inference.openai_api import ChatCompletionInputSerializer, CompletionInputSerializer

ABSENT = object()

# Each field: values a client plainly sends, and odd ones (valid but not plain, or invalid).
# A body is plain in every field, or plain but for one odd field: so that about half the
# examples are accepted by the fast path and compared, and the rest probe its edges.
plain_text = st.sampled_from(["tandem-test", "m", "gpt-4o-mini", "a b"])
odd_text = st.one_of(
    st.sampled_from(["", " padded ", "x" * 201, "naïve", "nul\x00", "\ud800", None, 5, ["m"]]), st.text(max_size=8)
)
plain_content = st.one_of(plain_text, st.text(max_size=12))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": plain_content})


def ints(low, high):
    return st.one_of(st.none(), st.integers(min_value=low, max_value=high))


def floats(low, high):
    return st.one_of(st.none(), st.integers(min_value=int(low), max_value=int(high)), st.floats(low, high))


odd_number = st.sampled_from([True, False, -1, -0.5, 2.5, 3, 2**63, -(2**63), 2**64, "1", 1.5, 0, 7])
PLAIN = {
    "model": plain_text,
    "max_tokens": ints(1, 4096),
    "temperature": floats(0.0, 2.0),
    "top_p": floats(0.0, 1.0),
    "top_k": ints(0, 50),
    "tier": st.one_of(st.none(), st.sampled_from(["edge", "speculative", "cloud"])),
    "seed": st.one_of(st.none(), st.integers(min_value=-(2**62), max_value=2**62)),
    "stop": st.one_of(st.none(), plain_content, st.lists(plain_content.filter(bool), max_size=4)),
    "n": st.one_of(st.none(), st.just(1)),
    "stream": st.one_of(st.none(), st.booleans()),
    "stream_options": st.one_of(
        st.none(), st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.none(), st.booleans())})
    ),
    "user": st.one_of(st.none(), plain_text),
    "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), plain_text, max_size=3)),
    "unknown_field": st.integers(),
}
ODD = {
    "model": odd_text,
    "max_tokens": odd_number,
    "temperature": odd_number,
    "top_p": odd_number,
    "top_k": odd_number,
    "tier": odd_text,
    "seed": odd_number,
    "stop": st.one_of(odd_text, st.sampled_from([[], [1], ["a"] * 5, [""], {"a": "b"}])),
    "n": odd_number,
    "stream": st.sampled_from([1, "true", 0]),
    "stream_options": st.sampled_from([[], "x", {"include_usage": "yes"}, {"include_usage": True, "other": 1}, {}]),
    "user": odd_text,
    "metadata": st.one_of(
        st.sampled_from([[], "x", {"a": 1}, {"a": " b "}, {"a": None}]),
        st.dictionaries(st.text(max_size=3), odd_text, max_size=2),
    ),
    "unknown_field": st.none(),
}
CHAT_PLAIN = {
    **PLAIN,
    "messages": st.lists(message, min_size=1, max_size=3),
    "max_completion_tokens": ints(1, 4096),
    "logprobs": st.one_of(st.none(), st.booleans()),
}
CHAT_ODD = {
    **ODD,
    "messages": st.sampled_from([None, [], "hi", {"role": "user"}, [None], [1]]),
    "max_completion_tokens": odd_number,
    "logprobs": st.sampled_from([1, "true", 0]),
    "top_logprobs": st.one_of(odd_number, st.integers(min_value=0, max_value=5)),
}
COMPLETION_PLAIN = {
    **PLAIN,
    "prompt": st.one_of(plain_content, st.lists(plain_content, min_size=1, max_size=1)),
    "logprobs": ints(0, 5),
}
COMPLETION_ODD = {
    **ODD,
    "prompt": st.sampled_from([None, 5, [], ["a", "b"], [5], {"p": "x"}]),
    "logprobs": odd_number,
}
REQUIRED = {"model", "messages", "prompt"}


@st.composite
def bodies(draw, plain: dict, odd: dict) -> dict:
    body = {}
    for name, values in plain.items():
        if name in REQUIRED or draw(st.booleans()):
            body[name] = draw(values)
    if draw(st.booleans()):  # one field odd, or missing
        name = draw(st.sampled_from(sorted(odd)))
        if draw(st.integers(0, 5)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(odd[name])
    return body


def serializer_result(serializer_class, body: dict) -> dict | None:
    # through JSON and back first, as a body arrives (tuples become lists, and so on)
    try:
        return json.loads(json.dumps(serializer_class().run_validation(body)))
    except serializers.ValidationError:
        return None


def as_json(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(
    ("fast", "serializer_class", "plain", "odd"),
    [
        (fast_bodies.chat, ChatCompletionInputSerializer, CHAT_PLAIN, CHAT_ODD),
        (fast_bodies.completion, CompletionInputSerializer, COMPLETION_PLAIN, COMPLETION_ODD),
    ],
)
def test_what_the_fast_path_accepts_the_serializer_accepts_with_the_same_result(fast, serializer_class, plain, odd):
    accepted = []

    @settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bodies(plain, odd))
    def check(body):
        got = fast(body)
        if got is not None:
            accepted.append(body)
            assert as_json(got) == serializer_result(serializer_class, body), body

    check()
    assert len(accepted) > 200  # the comparison ran on many bodies, not a handful


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tandem-test", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "temperature": 0},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "¿qué tal?"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
            "stop": ["\n"],
            "seed": 7,
            "user": "u-1",
            "metadata": {"team": "search"},
            "tier": "cloud",
        },
    ],
)
def test_the_bodies_clients_send_take_the_fast_path_with_the_serializers_result(body):
    got = fast_bodies.chat(body)
    assert got is not None
    assert as_json(got) == serializer_result(ChatCompletionInputSerializer, body)


def test_a_plain_completion_body_takes_the_fast_path():
    body = {"model": "m", "prompt": ["Once upon"], "max_tokens": 8, "logprobs": 1}
    got = fast_bodies.completion(body)
    assert got is not None and got["prompt"] == "Once upon" and got["logprobs"] == 1
    assert as_json(got) == serializer_result(CompletionInputSerializer, body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": " m ", "messages": [{"role": "user", "content": "hi"}]},  # DRF trims: it decides
        {"model": "m", "messages": []},  # refused by DRF, in its words
        {"model": "m", "messages": [{}], "top_logprobs": 2},  # top_logprobs without logprobs
        {"model": "m", "messages": [{}], "temperature": True},
        {"model": "m", "messages": [{}], "n": 2},
    ],
)
def test_anything_not_plain_is_left_to_the_serializer(body):
    assert fast_bodies.chat(body) is None
