from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and billing"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from tenants.models import ApiKey

        # Any change to a key row (a revocation, a new expiry or scopes in the admin, a
        # deletion) drops it from this process's key cache, whichever code made it.
        post_save.connect(_api_key_changed, sender=ApiKey, dispatch_uid="tenants.api_key_cache")
        post_delete.connect(_api_key_changed, sender=ApiKey, dispatch_uid="tenants.api_key_cache_delete")


def _api_key_changed(sender, instance, **kwargs) -> None:
    from tenants.services import api_key_cache_forget

    api_key_cache_forget(api_key=instance)
