"""Cross-tenant isolation, enumerated: every URL pattern and every websocket frame type, tried by tenant A on tenant B.

The URL patterns come from ``django.urls.get_resolver()`` (walked recursively, the admin
included) and the frame types from the consumer's ``on_<type>`` handlers, at collection
time: a new endpoint or frame type is covered without editing this file, and a pattern
whose path parameters this file does not know how to fill with B's objects fails loudly
(``PATH_PARAMETERS``, ``ADMIN_OBJECTS``).

For each URL, GET and POST (the body names B's objects in every usual field) from three
callers: anonymous, a signed-in member (owner, not staff) of tenant A, and A's API key as
a Bearer token. None of them may see B's identifying strings (its name, users, key
names and prefixes, request ids, policy note, private upstream) in any response, nor
change anything of B. A URL whose path names one of B's objects is refused (403 or 404,
405 for a method it does not take, a redirect to a sign-in page or 401 for who is not
signed in for it); the admin refuses A's member (not staff) everywhere but its public pages.

B's world is built once for the module and committed (the API reads through its own
database thread, which sees only committed rows), then the database is flushed, as a
transactional test does after itself.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.contrib.contenttypes.models import ContentType
from django.core.cache import cache
from django.core.management import call_command
from django.db import connection
from django.forms.models import model_to_dict
from django.test import Client
from django.test.utils import setup_databases, teardown_databases
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from batches import services as batch_services
from batches.models import Batch, BatchFile
from config.asgi import application
from inference.consumers import CompletionConsumer
from inference.limits import limiter
from inference.models import CloudUpstream, RoutingPolicy, SloSample
from inference.queueing import scheduler
from inference.routing import websocket_urlpatterns
from inference.services import cloud_upstream_register, routing_policy_publish
from tenants import selectors, services
from tenants.models import (
    ApiKey,
    AuditEvent,
    Budget,
    Invite,
    Membership,
    Price,
    PriceBook,
    Reservation,
    Tenant,
    UsageRecord,
)
from tenants.services import api_key_create, budget_set, price_book_publish, rate_limits_set
from tests.conftest import TEST_MODELS, TEST_RATES, TIERS, make_account
from tests.inference.conftest import GatedEngine, serving_gated

# what refusing looks like: not found, forbidden, wrong method, or (not signed in for it) 401 / a sign-in redirect
REFUSED = {401, 403, 404, 405}
# pages anyone may load: they show no tenant's data (asserted like every other page)
PUBLIC = {"frontend:login", "frontend:logout", "admin:login", "admin:logout", "admin:jsi18n", "openai:openapi"}
# Read with an API key or a console session alike (dashboards.apis): A's key and A's member get A's own numbers
# (nothing of B's: checked for every route), anyone else is refused.
KEY_OR_SESSION = {"dashboards:cost"}
PUBLIC |= {"frontend:password-reset", "frontend:password-reset-done", "frontend:password-reset-complete"}
TIMEOUT = 5


# enumerating the URL configuration --------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    route: str  # the pattern's full text, e.g. "keys/<int:pk>/revoke/"
    name: str  # "namespace:name", or "" for an unnamed pattern
    params: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.name or '-'}@{self.route}"

    @property
    def admin(self) -> bool:
        return self.route.startswith("admin/")

    @property
    def api(self) -> bool:
        return self.route.startswith("v1/")


def _walk(patterns, prefix: str = "", namespaces: tuple[str, ...] = ()) -> Iterator[Route]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            ns = (*namespaces, pattern.namespace) if pattern.namespace else namespaces
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), ns)
        elif isinstance(pattern, URLPattern):
            name = ":".join((*namespaces, pattern.name)) if pattern.name else ""
            params = tuple(pattern.pattern.regex.groupindex)
            yield Route(prefix + str(pattern.pattern), name, params)
        else:  # pragma: no cover - Django has only these two
            raise TypeError(f"unknown URL pattern type {type(pattern)!r}")


def all_routes() -> list[Route]:
    # a resolver's own groups (a parameterised include) would be missed by the walk above: none today
    assert not any(isinstance(p, URLResolver) and p.pattern.regex.groupindex for p in get_resolver().url_patterns)
    return list(_walk(get_resolver().url_patterns))


ROUTES = all_routes()


# B's world ----------------------------------------------------------------------------------------------
@dataclass
class World:
    a_user: User
    a_tenant: Tenant
    a_raw_key: str
    b_user: User
    b_tenant: Tenant
    b_key: ApiKey
    b_raw_key: str
    b_keys: list[ApiKey]
    b_policy: RoutingPolicy
    b_budget: Budget
    b_upstream: CloudUpstream
    b_group: Group
    b_request_ids: list[str]
    marks: list[str] = field(default_factory=list)  # B's identifying strings, lower-cased

    def b_state(self, *, with_spending: bool = True) -> dict[str, Any]:
        """Everything of B's that A might change, as plain values (``with_spending``: and what B's own requests move)."""
        b = self.b_tenant
        rows = {
            "tenant": Tenant.objects.filter(pk=b.pk),
            "memberships": Membership.objects.filter(tenant=b),
            "policies": RoutingPolicy.objects.filter(tenant=b),
            "upstreams": CloudUpstream.objects.filter(tenants=b),
            "users": User.objects.filter(memberships__tenant=b),
            "group": Group.objects.filter(pk=self.b_group.pk),
            "batches": Batch.objects.filter(tenant=b),
            "batch_files": BatchFile.objects.filter(tenant=b),
        }
        state = {name: sorted(repr(model_to_dict(row)) for row in qs) for name, qs in rows.items()}
        keys = ApiKey.objects.filter(tenant=b).order_by("pk")
        if with_spending:
            rows = {
                "budgets": Budget.objects.filter(tenant=b),
                "usage": UsageRecord.objects.filter(tenant=b),
                "reservations": Reservation.objects.filter(tenant=b),
            }
            state |= {name: sorted(repr(model_to_dict(row)) for row in qs) for name, qs in rows.items()}
            state["keys"] = [repr(model_to_dict(key)) for key in keys]
        else:  # B's own stream sets its key's last use and moves its budget's counters
            limits = ("revoked_at", "expires_at", "name", "scopes", *services.RATE_LIMIT_FIELDS)
            state["keys"] = [repr(model_to_dict(key, fields=limits)) for key in keys]
            state["budget_limits"] = [
                repr(model_to_dict(budget, fields=("period", "hard_limit", "soft_limit")))
                for budget in Budget.objects.filter(tenant=b).order_by("pk")
            ]
        return state


def _completion(raw_key: str, request_id: str) -> None:
    body = {"model": "tandem-test", "messages": [{"role": "user", "content": "globex quarterly numbers"}]}
    response = Client().post(
        "/v1/chat/completions",
        json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw_key}", "X-Request-Id": request_id},
    )
    assert response.status_code == 200, response.content


def build_world() -> World:
    prices = [{"model": m, "tier": t, **TEST_RATES} for m in TEST_MODELS for t in TIERS]
    price_book_publish(version=1, prices=prices, note="test prices")
    a = make_account("acme", User)
    b = make_account("globex", User)
    b_user, b_tenant, b_key = cast(User, b.user), cast(Tenant, b.tenant), cast(ApiKey, b.api_key)
    tag = secrets.token_hex(4)
    b_user.email = f"globex-owner-{tag}@globex.invalid"
    b_user.save()
    second, _ = api_key_create(tenant=b_tenant, created_by=b_user, name=f"globex batch {tag}")
    rate_limits_set(target=b_tenant, max_streams=7, requests_per_minute=77, tokens_per_minute=7777, by=b_user)
    rate_limits_set(target=second, max_streams=3, requests_per_minute=33, tokens_per_minute=3333, by=b_user)
    policy = routing_policy_publish(
        tenant=b_tenant, created_by=b_user, allowed_tiers=["edge", "speculative"], note=f"globex policy {tag}"
    )
    budget = budget_set(tenant=b_tenant, period="month", hard_limit=Decimal("123.45"), soft_limit=Decimal("100"))
    upstream = cloud_upstream_register(
        name=f"globex-private-{tag}",
        model="tandem-test",
        base_url=f"http://globex-upstream-{tag}.invalid/v1",
        upstream_model=f"globex-model-{tag}",
        prompt_per_mtok="0.5",
        completion_per_mtok="1.5",
        tenants=[b_tenant],
        note=f"globex upstream note {tag}",
    )
    group = Group.objects.create(name=f"globex-group-{tag}")
    request_ids = [f"globex-req-{tag}-{n}" for n in range(2)]
    for request_id in request_ids:
        _completion(b.raw_key, request_id)
    assert UsageRecord.objects.filter(tenant=b_tenant, request_id__in=request_ids).count() == 2
    batch_file = _b_batch(b_tenant, b_key, tag)
    marks = (
        b_tenant.name,
        b_tenant.slug,
        b_user.username,
        b_user.email,
        b.raw_key,
        *(k.name for k in (b_key, second)),
        *(k.prefix for k in (b_key, second)),
        *request_ids,
        policy.note,
        upstream.name,
        upstream.upstream_model,
        upstream.base_url,
        upstream.note,
        group.name,
        batch_file,
    )
    assert not any("acme" in mark.lower() for mark in marks)  # B's marks must not match A's own pages
    return World(
        a_user=cast(User, a.user),
        a_tenant=cast(Tenant, a.tenant),
        a_raw_key=a.raw_key,
        b_user=b_user,
        b_tenant=b_tenant,
        b_key=b_key,
        b_raw_key=b.raw_key,
        b_keys=[b_key, second],
        b_policy=policy,
        b_budget=budget,
        b_upstream=upstream,
        b_group=group,
        b_request_ids=request_ids,
        marks=[mark.lower() for mark in marks],
    )


def _b_batch(b_tenant: Tenant, b_key: ApiKey, tag: str) -> str:
    """A batch of B's (not run) and its input file; returns the file's name, one of B's marks."""
    line = {
        "custom_id": "q1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tandem-test", "prompt": "x"},
    }
    name = f"globex-batch-{tag}.jsonl"
    upload = batch_services.file_upload(
        tenant_id=b_tenant.pk, filename=name, content=json.dumps(line).encode(), purpose="batch"
    )
    batch_services.batch_create(
        tenant_id=b_tenant.pk,
        api_key_id=b_key.pk,
        input_file_id=upload.public_id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata=None,
    )
    return name


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker) -> Iterator[World]:
    with django_db_blocker.unblock():
        own_db = None
        if connection.settings_dict["NAME"] != connection.creation._get_test_db_name():
            # pytest-django sets the test database up only for a session holding a django_db
            # test; a run of only this module's other tests (-k) holds none: set it up here.
            own_db = setup_databases(verbosity=0, interactive=False, aliases={"default"})
        _fresh_process_state()
        built = build_world()
    yield built
    with django_db_blocker.unblock():
        # as a transactional test leaves it (pytest-django flushes, and post_migrate refills content types)
        call_command("flush", verbosity=0, interactive=False, database="default")
        if own_db is not None:
            teardown_databases(own_db, verbosity=0)
    _fresh_process_state()


def _fresh_process_state() -> None:
    services.api_key_cache.forget()
    selectors.price_cache.forget()
    scheduler.reset()
    limiter.reset()
    cache.clear()  # the sign-in throttle's counts among others


@pytest.fixture
def b_unchanged(world, django_db_blocker) -> Iterator[World]:
    """The world, with the ORM open to the test; after the test, B's rows must be exactly as before it."""
    with django_db_blocker.unblock():
        before = world.b_state()
        yield world
        assert world.b_state() == before, "tenant B's rows changed"


@pytest.fixture
def b_config_unchanged(world, django_db_blocker) -> Iterator[World]:
    """As ``b_unchanged``, for tests where B itself streams: B's settings, keys and limits must not change."""
    with django_db_blocker.unblock():
        before = world.b_state(with_spending=False)
        yield world
        assert world.b_state(with_spending=False) == before, "tenant B's settings changed"


# filling path parameters with B's objects ----------------------------------------------------------------
Fill = Callable[[World], object]


def _b_invite(world: World) -> Invite:
    """A pending invite of B's (made on first use: B's world has none of its own)."""
    invite = Invite.objects.filter(tenant=world.b_tenant).first()
    if invite is None:
        invite, _ = services.invite_create(
            tenant=world.b_tenant, email="invitee@globex.invalid", role="member", by=world.b_user
        )
    return invite


# (route name, parameter) -> B's value. A new URL with a parameter not listed here fails the test.
PATH_PARAMETERS: dict[tuple[str, str], Fill] = {
    ("frontend:api-key-revoke", "pk"): lambda w: w.b_key.pk,
    ("frontend:member-role", "pk"): lambda w: Membership.objects.get(tenant=w.b_tenant, user=w.b_user).pk,
    ("frontend:member-remove", "pk"): lambda w: Membership.objects.get(tenant=w.b_tenant, user=w.b_user).pk,
    ("frontend:invite-revoke", "pk"): lambda w: _b_invite(w).pk,
    # what A could know of B's invite is its stored hash at most: that is not the link's token
    ("frontend:invite-accept", "token"): lambda w: _b_invite(w).token_hash,
    ("frontend:password-reset-confirm", "uidb64"): lambda w: urlsafe_base64_encode(force_bytes(w.b_user.pk)),
    ("frontend:password-reset-confirm", "token"): lambda w: "set-password",  # Django's step 2, without B's session
    ("openai:model", "model_id"): lambda w: w.b_upstream.upstream_model,
    ("openai:not-found", "rest"): lambda w: f"upstreams/{w.b_upstream.name}",  # the API's catch-all 404
    ("frontend:batch-file", "file_id"): lambda w: BatchFile.objects.filter(tenant=w.b_tenant).latest("pk").public_id,
    ("batches:file", "file_id"): lambda w: BatchFile.objects.filter(tenant=w.b_tenant).latest("pk").public_id,
    ("batches:file-content", "file_id"): lambda w: BatchFile.objects.filter(tenant=w.b_tenant).latest("pk").public_id,
    ("batches:batch", "batch_id"): lambda w: Batch.objects.get(tenant=w.b_tenant).public_id,
    ("batches:batch-cancel", "batch_id"): lambda w: Batch.objects.get(tenant=w.b_tenant).public_id,
    ("admin:view_on_site", "content_type_id"): lambda w: ContentType.objects.get_for_model(Tenant).pk,
    ("admin:view_on_site", "object_id"): lambda w: w.b_tenant.pk,
    ("admin:auth_user_password_change", "id"): lambda w: w.b_user.pk,
    ("admin:app_list", "app_label"): lambda w: "tenants",
    ("@admin/(?P<url>.*)$", "url"): lambda w: f"tenants/tenant/{w.b_tenant.pk}/change",
}
# the admin's per-model URLs ("admin/<app>/<model>/<path:object_id>/..."): B's object of each registered model
ADMIN_OBJECTS: dict[str, Fill] = {
    "auth.group": lambda w: w.b_group.pk,
    "auth.user": lambda w: w.b_user.pk,
    "tenants.tenant": lambda w: w.b_tenant.pk,
    "tenants.membership": lambda w: Membership.objects.get(tenant=w.b_tenant, user=w.b_user).pk,
    "tenants.apikey": lambda w: w.b_key.pk,
    "tenants.budget": lambda w: w.b_budget.pk,
    "tenants.pricebook": lambda w: PriceBook.objects.latest("pk").pk,  # global, not a tenant's
    "tenants.price": lambda w: Price.objects.latest("pk").pk,
    "tenants.reservation": lambda w: Reservation.objects.filter(tenant=w.b_tenant).latest("pk").pk,
    "tenants.budgetlease": lambda w: 10**9,  # B holds none (leases are off in tests): an id that is no one's
    "tenants.usagerecord": lambda w: UsageRecord.objects.filter(tenant=w.b_tenant).latest("pk").pk,
    "tenants.invite": lambda w: _b_invite(w).pk,
    "tenants.auditevent": lambda w: AuditEvent.objects.filter(tenant=w.b_tenant).latest("pk").pk,
    "inference.slosample": lambda w: SloSample.objects.filter(tenant=w.b_tenant).latest("pk").pk,
    "inference.cloudupstream": lambda w: w.b_upstream.pk,
    "inference.routingpolicy": lambda w: w.b_policy.pk,
    # B sets no objective or webhook and fires no alert: ids that are no one's
    "slo.sloobjective": lambda w: 10**9,
    "slo.alert": lambda w: 10**9,
    "slo.alertwebhook": lambda w: 10**9,
    # beat's schedule (django-celery-beat) is the platform's, no tenant's: ids that are no one's
    "django_celery_beat.periodictask": lambda w: 10**9,
    "django_celery_beat.intervalschedule": lambda w: 10**9,
    "django_celery_beat.crontabschedule": lambda w: 10**9,
    "django_celery_beat.solarschedule": lambda w: 10**9,
    "django_celery_beat.clockedschedule": lambda w: 10**9,
}
ADMIN_MODEL_ROUTE = re.compile(r"^admin/(?P<app>\w+)/(?P<model>\w+)/<path:object_id>/")


def fill(route: Route, world: World) -> str:
    """The route's path with every parameter set to one of B's objects; unknown parameters fail loudly."""
    values: dict[str, object] = {}
    admin_model = ADMIN_MODEL_ROUTE.match(route.route)
    for param in route.params:
        key = (route.name or "@" + route.route, param)
        if key in PATH_PARAMETERS:
            values[param] = PATH_PARAMETERS[key](world)
        elif param == "object_id" and admin_model:
            label = f"{admin_model['app']}.{admin_model['model']}"
            if label not in ADMIN_OBJECTS:
                pytest.fail(f"{route.id}: add the admin model {label!r} to ADMIN_OBJECTS (B's object of it)")
            values[param] = ADMIN_OBJECTS[label](world)
        else:
            pytest.fail(f"{route.id}: add ({key[0]!r}, {param!r}) to PATH_PARAMETERS (how to name B's object)")
    path = re.sub(r"\(\?[aiLmsux]+\)", "", route.route)  # inline regex flags, e.g. (?s)
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: str(values[m[1]]), path)  # re_path() groups
    path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m[1]]), path)  # path() converters
    path = re.sub(r"(\.|\[\\s\\S\])[*+]", "no-such-path", path)  # a catch-all (.* or [\s\S]*): any path
    path = path.replace("^", "").replace("$", "")
    if re.search(r"[<>()?*+\[\]{}|\\]", path):
        pytest.fail(f"{route.id}: cannot write a path for this pattern ({path!r}); teach fill() one")
    return "/" + path


def form_body(world: World) -> dict[str, object]:
    """A console POST that names B's objects in every field a view might read an id from."""
    b_key = world.b_key.pk
    return {
        "tenant": world.b_tenant.pk,
        "target": b_key,
        "pk": b_key,
        "id": b_key,
        "api_key": b_key,
        "key": b_key,
        "user": world.b_user.pk,
        "policy": world.b_policy.pk,
        "upstream": world.b_upstream.pk,
        "name": "a's attempt",
        "max_streams": 1,
        "requests_per_minute": 1,
        "tokens_per_minute": 1,
        "next": "/usage/",
    }


def json_body(route: Route, world: World) -> dict[str, object]:
    """An API POST: a valid request of A's where one is known, naming B (``user``, ``tenant``) besides."""
    body: dict[str, object] = {"model": "tandem-test", "max_tokens": 4, "user": str(world.b_user.pk)}
    if route.name == "openai:chat-completions":
        body["messages"] = [{"role": "user", "content": "hello"}]
    elif route.name == "openai:completions":
        body["prompt"] = "hello"
    else:
        body["tenant"] = world.b_tenant.pk
    return body


# the callers --------------------------------------------------------------------------------------------
CALLERS = ("anonymous", "a_member", "a_key")


def caller_client(who: str, world: World) -> Client:
    if who == "anonymous":
        return Client()
    if who == "a_key":
        return Client(headers={"Authorization": f"Bearer {world.a_raw_key}"})
    client = Client()
    client.force_login(world.a_user)
    return client


def assert_no_b_data(world: World, label: str, content: bytes, sent: tuple[str, ...] = ()) -> None:
    """None of B's marks in ``content``, once what A itself sent (a path naming B's object, echoed) is cut out."""
    body = content.decode("utf-8", "replace").lower()
    for echoed in sorted(sent, key=len, reverse=True):
        body = body.replace(echoed.lower(), "")
    leaked = [mark for mark in world.marks if mark in body]
    assert not leaked, f"{label}: tenant B's {leaked} in the response"


def echoable(world: World, path: str) -> tuple[str, ...]:
    """What of B's A itself put in the path (B's model id, say), which an error message may quote back."""
    parts = [path, *path.strip("/").split("/")]
    return tuple(part for part in parts if any(mark in part.lower() for mark in world.marks))


def assert_refused(label: str, response, sign_in: str | None) -> None:
    """403/404/405/401, or a redirect to ``sign_in`` (a sign-in page) when the caller is not signed in for it."""
    if response.status_code == 302 and sign_in is not None:
        assert response.url.startswith(sign_in), f"{label}: redirected to {response.url}, not to sign in"
        return
    assert response.status_code in REFUSED, f"{label}: {response.status_code}, expected a refusal"


def sign_in_page(route: Route, who: str) -> str | None:
    """Where a caller not signed in for this route is sent (None: API routes answer 401 instead)."""
    if route.api:
        return None
    if route.admin:
        return "/admin/login/"  # the member is not staff: the admin treats them as not signed in
    return None if who == "a_member" else "/signin/"


# body-driven actions on B that must be refused, by (route name, caller): the allowed statuses
REFUSED_ACTIONS: dict[tuple[str, str], set[int]] = {
    ("frontend:tenant-switch", "a_member"): {403},  # switching into B, a tenant A's member is not in
    ("frontend:limits", "a_member"): {404},  # setting the limits of B's key from A's page
}


@pytest.mark.parametrize("route", ROUTES, ids=[r.id for r in ROUTES])
def test_no_url_gives_tenant_a_anything_of_tenant_b(route: Route, b_unchanged: World):
    world = b_unchanged
    path = fill(route, world)
    for who in CALLERS:
        for method in ("GET", "POST"):
            client = caller_client(who, world)
            label = f"{who} {method} {path}"
            if method == "GET":
                response = client.get(path)
            elif route.api:
                response = client.post(path, json.dumps(json_body(route, world)), content_type="application/json")
            else:
                response = client.post(path, form_body(world))
            content = b"".join(response.streaming_content) if response.streaming else response.content
            assert response.status_code < 500, f"{label}: {response.status_code}"
            assert_no_b_data(world, label, content, sent=echoable(world, path))
            must = REFUSED_ACTIONS.get((route.name, who))
            if must is not None and method == "POST":
                assert response.status_code in must, f"{label}: {response.status_code}, expected {must}"
            elif route.params:  # the path names B's object: nobody of A's gets it
                assert_refused(label, response, sign_in_page(route, who))
            elif route.name in PUBLIC:
                pass
            elif route.admin:  # A's member is not staff; the others are not signed in
                assert_refused(label, response, "/admin/login/")
            elif route.name in KEY_OR_SESSION:
                if who == "anonymous" or method == "POST":
                    assert_refused(label, response, None)
            elif route.api and who != "a_key":
                assert_refused(label, response, None)
            elif not route.api and who != "a_member":
                assert_refused(label, response, "/signin/")


# The one test marked for pytest-django: a session with a django_db test gets the test database,
# which this module's committed world needs (the others open the ORM through django_db_blocker).
@pytest.mark.django_db
def test_the_enumeration_found_the_console_the_api_and_the_admin():
    names = {r.name for r in ROUTES}
    assert {"frontend:api-key-revoke", "frontend:tenant-switch", "openai:chat-completions", "admin:index"} <= names
    assert len(ROUTES) > 50


def test_a_member_switching_to_tenant_b_stays_in_tenant_a(b_unchanged: World):
    world = b_unchanged
    client = caller_client("a_member", world)
    assert client.post("/tenant/", {"tenant": world.b_tenant.pk}).status_code == 403
    page = client.get("/usage/")
    assert page.status_code == 200 and world.a_tenant.name.encode() in page.content
    assert_no_b_data(world, "usage after the switch", page.content)


# websocket frames ---------------------------------------------------------------------------------------
WS_PATHS = ["/" + str(p.pattern) for p in websocket_urlpatterns]
FRAME_TYPES = sorted(name.removeprefix("on_") for name in vars(CompletionConsumer) if name.startswith("on_"))


def frame_naming_b(frame_type: str, world: World) -> dict:
    """A frame of each type the consumer takes, naming tenant B; a new type without an entry fails loudly."""
    frames: dict[str, dict[str, Any]] = {
        "start": {"type": "start", "id": "shared-id", "model": "tandem-test", "prompt": "hi", "max_tokens": 4},
        "cancel": {"type": "cancel", "id": "shared-id"},
        "ping": {"type": "ping"},
    }
    if frame_type not in frames:
        pytest.fail(f"add the websocket frame type {frame_type!r} to frame_naming_b")
    return {**frames[frame_type], "tenant": world.b_tenant.pk}


async def _socket(path: str, *headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://testserver"), *headers])
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def _a_headers(who: str, world: World) -> list[tuple[bytes, bytes]]:
    if who == "a_key":
        return [(b"authorization", f"Bearer {world.a_raw_key}".encode())]
    client = await sync_to_async(caller_client)("a_member", world)
    name = settings.SESSION_COOKIE_NAME
    return [(b"cookie", f"{name}={client.cookies[name].value}".encode())]


async def _frames_until_quiet(ws: WebsocketCommunicator) -> list[dict]:
    """The answer to the frame just sent (every frame gets one), and any more that follow it at once."""
    frames = [await ws.receive_json_from(timeout=TIMEOUT)]
    while not await ws.receive_nothing(timeout=0.3):
        frames.append(await ws.receive_json_from(timeout=TIMEOUT))
    return frames


@pytest.mark.asyncio
@pytest.mark.parametrize("path", WS_PATHS)
@pytest.mark.parametrize("who", ["a_member", "a_key"])
@pytest.mark.parametrize("frame_type", FRAME_TYPES)
async def test_no_websocket_frame_acts_in_tenant_b(frame_type: str, who: str, path: str, b_config_unchanged: World):
    """While B streams on its own connection, A's frame naming B (and B's stream id) is refused or harmless."""
    world = b_config_unchanged
    b_usage = await UsageRecord.objects.filter(tenant=world.b_tenant).acount()
    with serving_gated(GatedEngine(free_tokens=1)) as engine:  # B's stream starts, then waits mid-stream
        b_ws = await _socket(path, (b"authorization", f"Bearer {world.b_raw_key}".encode()))
        await b_ws.send_json_to({"type": "start", "id": "shared-id", "model": "tandem-test", "prompt": "x"})
        b_started = await b_ws.receive_json_from(timeout=TIMEOUT)
        assert b_started["type"] == "started", b_started
        a_ws = await _socket(path, *await _a_headers(who, world))
        await a_ws.send_json_to(frame_naming_b(frame_type, world))
        frames = await _frames_until_quiet(a_ws)
        label = f"{who} {frame_type} naming tenant B on {path}"
        for frame in frames:
            assert_no_b_data(world, label, json.dumps(frame).encode())
            assert b_started["request_id"] not in json.dumps(frame), f"{label}: B's request id in {frame}"
        if frame_type == "start":
            assert [f["type"] for f in frames] == ["error"], f"{label}: {frames}"
            assert frames[0]["error"]["code"] == "permission_denied", frames  # 403: not a tenant of A's
        elif frame_type == "cancel":  # B's stream id is not A's: nothing to cancel on A's connection
            assert [f["type"] for f in frames] == ["error"] and frames[0]["error"]["param"] == "id", frames
        elif frame_type == "ping":
            assert frames == [{"type": "pong"}]
        await a_ws.disconnect()
        engine.gate.release(10_000)
        b_frames: list[dict] = []
        while not b_frames or b_frames[-1]["type"] not in ("done", "error"):
            b_frames.append(await b_ws.receive_json_from(timeout=TIMEOUT))
        assert b_frames[-1]["type"] == "done" and b_frames[-1]["usage"]["outcome"] == "completed", b_frames[-1]
        await b_ws.disconnect()
    assert await UsageRecord.objects.filter(tenant=world.b_tenant).acount() == b_usage + 1  # B's own stream only
    assert await UsageRecord.objects.filter(tenant=world.a_tenant, request_id=b_started["request_id"]).acount() == 0
