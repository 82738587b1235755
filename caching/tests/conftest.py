"""The generation app's fixtures (fake upstream, provider settings, models) for the
end-to-end tests of the cache tier."""

from generation.tests.conftest import (  # noqa: F401
    fake_upstream,
    openai_model,
    upstream_settings,
)
