from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "quotas"
    verbose_name = "Quotas and keys"

    def ready(self) -> None:
        from quotas import schema, signals  # noqa: F401  (OpenAPI; audit trail and live policy)
