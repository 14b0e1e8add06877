"""URL routing: the console at /, the OpenAI-compatible API under /v1/, the admin at /admin/."""

from django.contrib import admin
from django.urls import include, path

from inference.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include("batches.urls")),  # files and batch jobs (batches.apis), before the API's catch-all
    path("v1/", include("inference.urls")),
    path("api/dashboards/", include("dashboards.urls")),  # the cost report as JSON (dashboards.apis)
    path("metrics", metrics_view, name="metrics"),  # Prometheus, for operators and scrapers (inference.metrics)
    path("", include("frontend.urls")),
]
