"""Batch jobs through the OpenAI-compatible API, with the official client (eager Celery, the trivial engine)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from batches.models import Batch, BatchFile
from batches.storage import batch_storage
from config.asgi import application
from tenants.models import UsageRecord

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
BASE = "http://testserver"


def chat_line(custom_id: str, content: str = "Hello there", **body) -> dict:
    body = {"model": "tandem-test", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(*lines: dict | str) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=BASE) as client:
        yield client


def official(raw_key: str, http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=raw_key, http_client=http, max_retries=0)


async def run_batch_file(client: openai.AsyncOpenAI, content: bytes, **create):
    uploaded = await client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
    created = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **create
    )
    return uploaded, created, await client.batches.retrieve(created.id)  # eager Celery: it ran within create


def entries(content: bytes) -> list[dict]:
    return [json.loads(row) for row in content.decode().splitlines()]


async def test_the_official_client_uploads_creates_polls_and_downloads_a_batch(account, http):
    client = official(account.raw_key, http)
    content = jsonl(chat_line("a"), chat_line("b", "Another"))
    uploaded, created, done = await run_batch_file(client, content, metadata={"job": "nightly"})
    assert uploaded.purpose == "batch" and uploaded.bytes == len(content)
    assert (await client.files.content(uploaded.id)).content == content
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (2, 2, 0)
    output = entries((await client.files.content(done.output_file_id)).content)
    assert [e["custom_id"] for e in output] == ["a", "b"]
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "Tandem"
    listed = await client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [created.id]


async def test_each_line_is_charged_once_in_the_ledger_tagged_with_its_batch(account, http):
    _, created, done = await run_batch_file(official(account.raw_key, http), jsonl(chat_line("a"), chat_line("b")))
    rows = [row async for row in UsageRecord.objects.filter(tags__batch_id=created.id)]
    assert len(rows) == 2 and {r.request_id for r in rows} == {f"{created.id}_0", f"{created.id}_1"}
    output = entries((await official(account.raw_key, http).files.content(done.output_file_id)).content)
    assert {e["response"]["request_id"] for e in output} == {r.request_id for r in rows}


async def test_a_batch_line_answers_what_the_same_request_sent_alone_answers(account, http):
    client = official(account.raw_key, http)
    _, _, done = await run_batch_file(client, jsonl(chat_line("a", "Say something", max_tokens=9)))
    batch_body = entries((await client.files.content(done.output_file_id)).content)[0]["response"]["body"]
    alone = await client.chat.completions.create(
        model="tandem-test", messages=[{"role": "user", "content": "Say something"}], max_tokens=9
    )
    assert batch_body["choices"][0]["message"]["content"] == alone.choices[0].message.content
    assert batch_body["usage"] == alone.usage.model_dump(exclude_none=True) | {"total_tokens": alone.usage.total_tokens}


async def test_bad_lines_fail_alone_into_the_error_file_with_clear_messages(account, http):
    client = official(account.raw_key, http)
    content = jsonl(
        chat_line("good"),
        "{not json",
        chat_line("unknown-model", model="no-such-model"),
        chat_line("too-long", "x" * 40_000),
        chat_line("bad-param", temperature="hot"),
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
    )
    _, _, done = await run_batch_file(client, content)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 1, 5)
    output = entries((await client.files.content(done.output_file_id)).content)
    assert [e["custom_id"] for e in output] == ["good"]
    errors = {e["custom_id"]: e for e in entries((await client.files.content(done.error_file_id)).content)}
    assert errors[None]["error"]["code"] == "invalid_json" and "line 2" in errors[None]["error"]["message"]
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert errors["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["bad-param"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["wrong-url"]["error"]["code"] == "invalid_url"
    assert await UsageRecord.objects.acount() == 1  # only the good line was charged


@pytest.mark.parametrize(
    ("content", "purpose", "message"),
    [
        (b"", "batch", "empty"),
        (b"\xff\xfe", "batch", "not UTF-8"),
        (b"[1]\n", "batch", "no line of the file is a JSON object"),
        (jsonl(chat_line("same"), chat_line("same")), "batch", "custom_id 'same' is on lines 1 and 2"),
        (jsonl(chat_line("a")), "fine-tune", "purpose must be 'batch'"),
    ],
)
async def test_an_unusable_file_is_refused_with_a_clear_error(account, http, content, purpose, message):
    with pytest.raises(openai.BadRequestError) as refused:
        await official(account.raw_key, http).files.create(file=("f.jsonl", io.BytesIO(content)), purpose=purpose)
    assert message in refused.value.message


async def test_an_uploaded_files_name_is_kept_as_a_plain_file_name(account, http):
    content = jsonl(chat_line("a"))
    uploaded = await official(account.raw_key, http).files.create(
        file=("../../etc/evil file.jsonl", io.BytesIO(content)), purpose="batch"
    )
    assert uploaded.filename == "evil_file.jsonl"


async def test_a_batch_of_an_unknown_file_or_endpoint_is_refused_and_charges_nothing(account, http):
    client = official(account.raw_key, http)
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    uploaded = await client.files.create(file=("f.jsonl", io.BytesIO(jsonl(chat_line("a")))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.body["param"] == "endpoint"
    assert not await Batch.objects.aexists() and not await UsageRecord.objects.aexists()


async def test_another_tenants_key_gets_404_for_a_batch_and_its_files(account, other_account, http):
    _, created, done = await run_batch_file(official(account.raw_key, http), jsonl(chat_line("a")))
    other = official(other_account.raw_key, http)
    for call in (
        other.batches.retrieve(created.id),
        other.batches.cancel(created.id),
        other.files.retrieve(done.output_file_id),
        other.files.content(done.input_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await other.batches.list()).data == []


async def test_listing_pages_with_after_and_limit(account, http):
    client = official(account.raw_key, http)
    made = [(await run_batch_file(client, jsonl(chat_line("a"))))[1].id for _ in range(3)]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [made[0]] and not rest.has_more


async def test_files_are_listed_newest_first_and_a_deleted_file_is_gone_with_its_bytes(account, other_account, http):
    client = official(account.raw_key, http)
    first, _, done = await run_batch_file(client, jsonl(chat_line("a")))
    second = await client.files.create(file=("more.jsonl", io.BytesIO(jsonl(chat_line("b")))), purpose="batch")
    listed = await client.files.list(purpose="batch")
    assert [f.id for f in listed.data] == [second.id, first.id]
    assert first.expires_at == first.created_at + 30 * 86400  # TANDEM_BATCH_RETENTION_DAYS
    assert done.output_file_id in [f.id for f in (await client.files.list()).data]
    stranger = official(other_account.raw_key, http)
    with pytest.raises(openai.NotFoundError):
        await stranger.files.delete(first.id)
    found = await BatchFile.objects.aget(public_id=first.id)
    assert (await client.files.delete(first.id)).deleted is True
    assert not batch_storage().exists(found.storage_name)  # the prompts are gone, not hidden
    for call in (client.files.retrieve(first.id), client.files.content(first.id), client.files.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert [f.id for f in (await client.files.list(purpose="batch")).data] == [second.id]
    assert (await client.batches.retrieve(done.id)).input_file_id == first.id  # the batch still names it


async def test_the_input_of_a_batch_that_has_not_ended_cannot_be_deleted(account, http):
    client = official(account.raw_key, http)
    uploaded = await client.files.create(file=("r.jsonl", io.BytesIO(jsonl(chat_line("a")))), purpose="batch")
    source = await BatchFile.objects.aget(public_id=uploaded.id)
    await sync_to_async(Batch.objects.create)(
        tenant=account.tenant, endpoint="/v1/chat/completions", input_file=source, expires_at=source.created_at
    )  # a batch waiting for its worker
    with pytest.raises(openai.ConflictError, match="cancel it first"):
        await client.files.delete(uploaded.id)
    assert (await client.files.retrieve(uploaded.id)).id == uploaded.id
