from django.urls import path

from generation.jobs_views import JobCreateView, JobDetailView

urlpatterns = [
    path("jobs", JobCreateView.as_view(), name="job-create"),
    path("jobs/<uuid:job_id>", JobDetailView.as_view(), name="job-detail"),
]
