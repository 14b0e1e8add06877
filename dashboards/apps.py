"""The dashboards app: rollups of the ledger and the reads the console's cost dashboard and its API make."""

from django.apps import AppConfig


class DashboardsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "dashboards"
