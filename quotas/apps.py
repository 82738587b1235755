from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "quotas"
    verbose_name = "Quotas and keys"

    def ready(self) -> None:
        from quotas import signals  # noqa: F401  (audit trail and live policy invalidation)
