from django.urls import path

from generation import views

urlpatterns = [
    path("generate", views.GenerationCreateView.as_view(), name="generate"),
    path("topics/subtopics", views.TopicSubtopicsView.as_view(), name="topic-subtopics"),
    path("topics/explanations", views.TopicExplanationsView.as_view(), name="topic-explanations"),
]
