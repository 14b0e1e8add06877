"""The console's URLs (included at ``/``): sign in and out, tenant switch, playground, API keys, usage, routing, limits."""

from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import batches, costs, model_versions, passwords, slo, team, views
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
    path("batches/", batches.batches_page, name="batches"),
    path("batches/progress.json", batches.batches_progress, name="batches-progress"),
    path("batches/files/<str:file_id>/", batches.batch_file, name="batch-file"),
    path("costs/", costs.costs, name="costs"),
    path("costs/export.csv", costs.costs_csv, name="costs-csv"),
    path("slo/", slo.dashboard, name="slo"),
    path("slo/objective/", slo.objective_save, name="slo-objective"),
    path("slo/objective/reset/", slo.objective_reset, name="slo-objective-reset"),
    path("slo/webhook/", slo.webhook_save, name="slo-webhook"),
    path("team/", team.team, name="team"),
    path("team/members/<int:pk>/role/", team.member_role, name="member-role"),
    path("team/members/<int:pk>/remove/", team.member_remove, name="member-remove"),
    path("team/invites/<int:pk>/revoke/", team.invite_revoke, name="invite-revoke"),
    path("invite/<str:token>/", team.invite_accept, name="invite-accept"),
    path("audit/", team.audit, name="audit"),
    path("models/", model_versions.models_page, name="models"),
    path("models/pin/", model_versions.model_pin, name="model-pin"),
    path("models/rollouts/", model_versions.rollout_create, name="rollout-create"),
    path("models/rollouts/decide/", model_versions.rollout_action, name="rollout-action"),
    path("operator/audit/", team.operator_audit, name="operator-audit"),
    path("password/change/", passwords.PasswordChange.as_view(), name="password-change"),
    path("password/reset/", passwords.PasswordReset.as_view(), name="password-reset"),
    path("password/reset/sent/", passwords.PasswordResetDone.as_view(), name="password-reset-done"),
    path("password/reset/<uidb64>/<token>/", passwords.PasswordResetConfirm.as_view(), name="password-reset-confirm"),
    path("password/reset/complete/", passwords.PasswordResetComplete.as_view(), name="password-reset-complete"),
]
