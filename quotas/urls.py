from django.urls import path

from quotas import views

urlpatterns = [
    path("quota", views.QuotaStandingView.as_view(), name="quota-standing"),
    path("quota/global", views.QuotaGlobalView.as_view(), name="quota-global"),
    path("usage", views.UsageListView.as_view(), name="usage-list"),
]
