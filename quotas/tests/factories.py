from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from factory.django import DjangoModelFactory

from quotas.models import LOCAL_MODEL_PREFIX, ModelPrice, Plan, Provider, UserQuota


class UserFactory(DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")


class PlanFactory(DjangoModelFactory):
    class Meta:
        model = Plan

    name = factory.Sequence(lambda n: f"plan{n}")


class UserQuotaFactory(DjangoModelFactory):
    class Meta:
        model = UserQuota

    user = factory.SubFactory(UserFactory)
    plan = factory.SubFactory(PlanFactory)


class ModelPriceFactory(DjangoModelFactory):
    class Meta:
        model = ModelPrice
        django_get_or_create = ("model",)

    model = "local/demo"
    # The naming rule of ModelPrice.clean(): `local/` names and only those are `local`.
    provider = factory.LazyAttribute(
        lambda o: Provider.LOCAL if o.model.startswith(LOCAL_MODEL_PREFIX) else Provider.OPENAI
    )
    upstream_model = "demo"
    input_per_million = "1.50"
    output_per_million = "2.00"

    @classmethod
    def _after_postgeneration(cls, instance, create, results=None):
        if create:  # prices given as strings come back as the Decimals the model stores
            instance.refresh_from_db()
