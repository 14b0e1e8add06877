"""The dashboards' API (included at ``/api/dashboards/``)."""

from django.urls import path

from dashboards import apis

app_name = "dashboards"

urlpatterns = [
    path("cost/", apis.CostReportApi.as_view(), name="cost"),
]
