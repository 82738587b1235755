from django.urls import path

from generation import views

urlpatterns = [
    path("chat/completions", views.ChatCompletionCreateView.as_view(), name="chat-completions"),
    path("models", views.ModelListView.as_view(), name="models"),
    # Catalogue names hold slashes ("local/demo"), sent as they are or percent-encoded.
    path("models/<path:model>", views.ModelDetailView.as_view(), name="model-detail"),
]
