"""The dashboards' HTTP API: ``GET /api/dashboards/cost/``, the cost report as JSON, for an API key or a console session.

Tenant scoping happens once, in ``TenantScopedAPIView.initial`` (fail-closed): an API key
reads its own tenant and nothing else; a signed-in member reads a tenant they belong to
(``?tenant=<id>``, else their first); an operator (Django staff) any tenant, or
``?tenant=all`` for the total of all. Views get the resolved scope and never widen it.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from dashboards import selectors
from dashboards.params import InvalidParams, report_params
from dashboards.selectors import ALL_TENANTS, TenantScope
from tenants import errors as tenant_errors
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services
from tenants.models import ApiKey, Tenant


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>``: the key's tenant is the only one its requests may read."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None  # not a key: the session may still authenticate
        try:
            key = tenant_services.api_key_authenticate(raw_key=raw_key.strip())
        except tenant_errors.InvalidApiKey as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return None, key

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class TenantScopedAPIView(APIView):
    """A read of one tenant's numbers (or, for operators, all): the scope is resolved here and nowhere else."""

    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]
    permission_classes: list = []
    scope: TenantScope

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        self.scope = self._resolve_scope(request)

    def _resolve_scope(self, request: Request) -> TenantScope:
        asked = (request.query_params.get("tenant") or "").strip()
        if isinstance(request.auth, ApiKey):
            if asked and asked != str(request.auth.tenant_id):
                raise exceptions.PermissionDenied("an API key reads its own tenant only")
            return request.auth.tenant_id
        user = request.user
        if user is None or not user.is_authenticated:
            raise exceptions.NotAuthenticated("send an API key ('Authorization: Bearer <key>') or sign in")
        if user.is_staff:
            if asked == ALL_TENANTS:
                return ALL_TENANTS
            if asked:
                if not asked.isdigit() or not Tenant.objects.filter(pk=int(asked)).exists():
                    raise exceptions.NotFound(f"no tenant {asked!r}")
                return int(asked)
        if asked:
            if not asked.isdigit():
                raise exceptions.PermissionDenied("tenant must be the id of a tenant you belong to")
            try:
                return tenant_selectors.membership_get(user=user, tenant_id=int(asked)).tenant_id
            except tenant_errors.NotAMember:
                raise exceptions.PermissionDenied(f"you are not a member of tenant {asked}") from None
        membership = tenant_selectors.memberships_for_user(user=user).order_by("pk").first()
        if membership is None:
            raise exceptions.PermissionDenied("you are not a member of any tenant")
        return membership.tenant_id

    def get_queryset(self):  # pragma: no cover - a guard, not a feature
        raise NotImplementedError("scoped views read through selectors with self.scope; never a raw queryset")


def _money_field() -> serializers.DecimalField:
    return serializers.DecimalField(max_digits=30, decimal_places=9, coerce_to_string=True)


def _count_field() -> serializers.DecimalField:
    return serializers.DecimalField(max_digits=30, decimal_places=3, coerce_to_string=True)


class MeasuresSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    drafted_tokens = _count_field()
    accepted_tokens = serializers.IntegerField()
    gpu_ms = _count_field()
    cost_edge = _money_field()
    cost_verifier = _money_field()
    cost_cloud = _money_field()
    cost_total = _money_field()
    saving = _money_field()


class CostReportApi(TenantScopedAPIView):
    """The cost report over a range, by bucket, split value, tier and source; with totals, acceptance and savings."""

    class InputSerializer(serializers.Serializer):
        start = serializers.CharField(required=False, allow_blank=True)
        end = serializers.CharField(required=False, allow_blank=True)
        range = serializers.CharField(required=False, allow_blank=True)
        granularity = serializers.CharField(required=False, allow_blank=True)
        split = serializers.CharField(required=False, allow_blank=True)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            try:
                attrs["params"] = report_params(attrs, timezone.now())
            except InvalidParams as exc:
                raise serializers.ValidationError({exc.param: exc.message}) from None
            return attrs

    class OutputSerializer(serializers.Serializer):
        class RowSerializer(MeasuresSerializer):
            bucket = serializers.DateTimeField()
            value = serializers.CharField()
            label = serializers.CharField()
            route_tier = serializers.CharField()
            source = serializers.CharField()

        class StackSerializer(MeasuresSerializer):
            stack = serializers.CharField()
            label = serializers.CharField()

        class AcceptanceSerializer(serializers.Serializer):
            drafted_tokens = _count_field()
            accepted_tokens = serializers.IntegerField()
            rate = serializers.DecimalField(max_digits=10, decimal_places=4, allow_null=True)
            verifier_passes = serializers.IntegerField()
            gpu_ms = _count_field()
            ms_per_pass = serializers.DecimalField(max_digits=30, decimal_places=3, allow_null=True)
            verifier_ms_saved = _count_field()

        class SavingsSerializer(serializers.Serializer):
            actual = _money_field()
            all_cloud = _money_field()
            all_verifier = _money_field()
            saved_vs_cloud = serializers.DecimalField(max_digits=30, decimal_places=9, allow_null=True)
            saved_vs_verifier = serializers.DecimalField(max_digits=30, decimal_places=9, allow_null=True)
            unpriced = serializers.DictField(child=serializers.ListField(child=serializers.CharField()))

        tenant = serializers.CharField()
        start = serializers.DateTimeField()
        end = serializers.DateTimeField()
        granularity = serializers.CharField()
        split = serializers.CharField()
        totals = MeasuresSerializer()
        by_tier = StackSerializer(many=True, source="by_stack")
        rows = RowSerializer(many=True)
        acceptance = AcceptanceSerializer()
        savings = SavingsSerializer()

    def get(self, request: Request) -> Response:
        given = self.InputSerializer(data=request.query_params)
        if not given.is_valid():
            param, messages = next(iter(given.errors.items()))
            message = messages[0] if isinstance(messages, list) else messages
            return Response({"error": {"param": param, "message": str(message)}}, status=status.HTTP_400_BAD_REQUEST)
        p = given.validated_data["params"]
        report = selectors.cost_report(
            tenant=self.scope, start=p.start, end=p.end, granularity=p.granularity, split=p.split, tag_key=p.tag_key
        )
        out = self.OutputSerializer(
            {
                **report.__dict__,
                "rows": report.rows,
                "tenant": str(report.tenant),
                "split": p.split + (f":{p.tag_key}" if p.tag_key else ""),
            }
        )
        return Response(out.data)
