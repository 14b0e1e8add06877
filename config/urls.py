"""URL routing: the console at /, the OpenAI-compatible API under /v1/, the admin at /admin/."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include("inference.urls")),
    path("", include("frontend.urls")),
]
