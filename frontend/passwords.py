"""Passwords in the console: change yours (signed in), and reset a forgotten one by mail.

Django's auth views with the console's templates. A reset needs a mail server
(``EMAIL_HOST``); without one the reset page says so and sends nothing, rather than
claiming a link is on its way. Reset links are Django's: single-use, signed with the
user's password hash and last sign-in, valid for ``PASSWORD_RESET_TIMEOUT``.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.urls import reverse_lazy

from frontend.team import mail_configured
from frontend.views import current_membership
from tenants import selectors


class _ConsolePage:
    """The header's tenant switch, as ``frontend.views._render`` gives every console page."""

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)  # type: ignore[misc]
        request = self.request  # type: ignore[attr-defined]
        membership = current_membership(request) if request.user.is_authenticated else None
        memberships = list(selectors.memberships_for_user(user=request.user)) if membership else []
        tenant = membership.tenant if membership else None
        return {**context, "memberships": memberships, "membership": membership, "tenant": tenant}


class PasswordChange(_ConsolePage, auth_views.PasswordChangeView):
    template_name = "frontend/password_change.html"
    success_url = reverse_lazy("frontend:playground")

    def form_valid(self, form):
        response = super().form_valid(form)  # keeps this session signed in; other sessions end
        messages.success(self.request, "Your password is changed.")
        return response


class PasswordReset(_ConsolePage, auth_views.PasswordResetView):
    template_name = "frontend/password_reset.html"
    email_template_name = "frontend/password_reset_email.txt"
    subject_template_name = "frontend/password_reset_subject.txt"
    success_url = reverse_lazy("frontend:password-reset-done")

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "mail_configured": mail_configured()}

    def form_valid(self, form) -> HttpResponse:
        if not mail_configured():
            # Honest: nothing can be sent, so nothing is, and the page says so (503: this server cannot do it now).
            return self.render_to_response(self.get_context_data(form=form), status=503)
        return super().form_valid(form)


class PasswordResetDone(_ConsolePage, auth_views.PasswordResetDoneView):
    template_name = "frontend/password_reset_done.html"


class PasswordResetConfirm(_ConsolePage, auth_views.PasswordResetConfirmView):
    template_name = "frontend/password_reset_confirm.html"
    success_url = reverse_lazy("frontend:password-reset-complete")

    def dispatch(self, *args, **kwargs):
        response = super().dispatch(*args, **kwargs)
        if not self.validlink and response.status_code == 200:
            response.status_code = 404  # a wrong, used or expired link names no account that can be reset
        return response


class PasswordResetComplete(_ConsolePage, auth_views.PasswordResetCompleteView):
    template_name = "frontend/password_reset_complete.html"
