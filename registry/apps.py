from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        # The gateway asks this chooser which draft serves each new session (current,
        # canary candidate, tenant pin); it is the one process-wide object the app owns.
        from inference.engines import set_draft_chooser
        from registry.serving import draft_plans

        set_draft_chooser(draft_plans)
