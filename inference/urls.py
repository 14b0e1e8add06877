"""The OpenAI-compatible API, included at /v1/ (see :mod:`inference.openai_api`)."""

from django.urls import path, re_path

from inference import openai_api, openapi

app_name = "openai"
urlpatterns = [
    path("chat/completions", openai_api.chat_completions, name="chat-completions"),
    path("completions", openai_api.completions, name="completions"),
    path("models", openai_api.models_list, name="models"),
    # model ids may hold a slash ("org/name"), as OpenAI's fine-tune ids and hub ids do
    path("models/<path:model_id>", openai_api.model_detail, name="model"),
    path("openapi.json", openapi.openapi_json, name="openapi"),
    # anything else under /v1/ (a path no route matches, a model id with a line break): OpenAI's 404, not HTML
    # ([\s\S] and not (?s): Django must be able to reverse every pattern, and cannot reverse inline flags)
    re_path(r"^(?P<rest>[\s\S]*)$", openai_api.not_found, name="not-found"),
]
