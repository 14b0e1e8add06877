"""What the inference side records besides the ledger: one SLO sample per finished request."""

from django.db import models


class SloSample(models.Model):
    """Latency and outcome of one request (TTFT, mean inter-token, end to end), for SLO dashboards."""

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="slo_samples")
    model = models.CharField(max_length=128)
    route_tier = models.CharField(max_length=16)
    ttft_ms = models.FloatField(null=True)
    inter_token_ms = models.FloatField(null=True)
    e2e_ms = models.FloatField()
    tokens = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.outcome} ttft={self.ttft_ms}"
