"""The console's URLs (included at ``/``): sign in and out, tenant switch, playground, API keys, usage, routing, limits."""

from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import views
from frontend.signin import SignInView

app_name = "frontend"

urlpatterns = [
    path("", views.playground, name="playground"),
    path("signin/", SignInView.as_view(), name="login"),  # throttled: frontend.signin
    path("signout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tenant/", views.tenant_switch, name="tenant-switch"),
    path("keys/", views.api_keys, name="api-keys"),
    path("keys/<int:pk>/revoke/", views.api_key_revoke, name="api-key-revoke"),
    path("usage/", views.usage, name="usage"),
    path("routing/", views.routing, name="routing"),
    path("limits/", views.limits, name="limits"),
]
