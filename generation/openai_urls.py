from django.urls import path

from generation import views

urlpatterns = [
    path("chat/completions", views.ChatCompletionCreateView.as_view(), name="chat-completions"),
]
