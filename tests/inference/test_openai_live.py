"""The official OpenAI client against a real server (config.serve on loopback), streaming over real HTTP."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture
def client(platform_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform_server.url}/v1", api_key=platform_server.api_key, max_retries=0)


def test_the_official_client_streams_chat_with_usage_from_a_live_server(client):
    chunks = list(
        client.chat.completions.create(
            model="tandem-test",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Tandem drafts at the"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    whole = client.chat.completions.create(
        model="tandem-test", messages=[{"role": "user", "content": "Hello"}], max_tokens=20
    )
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "length"


def test_the_official_client_lists_models_and_raises_typed_errors(client, platform_server):
    assert {m.id for m in client.models.list()} == {"tandem-test", "tandem-test-broken"}
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=3)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{platform_server.url}/v1", api_key="tdm_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.models.list()
    assert refused.value.status_code == 401
    received = []
    with pytest.raises(openai.APIError) as failed:  # an error mid-stream arrives as a data event
        for chunk in client.completions.create(model="tandem-test-broken", prompt="x", max_tokens=30, stream=True):
            received.append(chunk.choices[0].text)
    # the server's error event after the tokens it sent, not a dropped connection (an APIError too)
    assert type(failed.value) is openai.APIError and failed.value.message == "the engine failed: RuntimeError"
    assert (failed.value.type, failed.value.code) == ("server_error", "engine_error")
    assert "".join(received) == "Tandem"  # tandem-test-broken fails after 6 tokens
