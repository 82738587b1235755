from django.contrib import admin
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from config.schema_views import SchemaView, SwaggerView
from health import dashboard
from health import views as health_views

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard.dashboard), name="admin-dashboard"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("quotas.urls")),
    path("api/v1/", include("generation.urls")),
    path("api/v1/", include("caching.urls")),
    path("api/v1/", include("generation.jobs_urls")),
    path("v1/", include("generation.openai_urls")),
    path("health/", include("health.urls")),
    path("metrics", health_views.metrics, name="metrics"),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    # Unknown API URLs answer in the contract's shape even with DEBUG on (Django's debug
    # 404 page would answer HTML), whatever the method: a POST with no CSRF token would
    # otherwise get Django's HTML CSRF page (a 403) before the 404.
    re_path(r"^(?:api|v1)/", csrf_exempt(health_views.api_not_found), name="api-not-found"),
]

handler400 = "health.views.bad_request"
handler404 = "health.views.page_not_found"
handler500 = "health.views.server_error"
