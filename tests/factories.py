import factory
from django.contrib.auth import get_user_model

from agents.models import Agent
from chat.models import ChatSession, Message
from projects.models import Project


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.PostGenerationMethodCall("set_password", "pw-123456")

    @factory.post_generation
    def save_password(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"project {n}")


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent

    project = factory.SubFactory(ProjectFactory)
    name = factory.Sequence(lambda n: f"agent-{n}")
    system_prompt = "You are a helpful agent."
    model = "offline"
    params = factory.LazyFunction(lambda: {"temperature": 0.2, "top_k": 3})


class ChatSessionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ChatSession

    agent = factory.SubFactory(AgentFactory)
    project = factory.SelfAttribute("agent.project")
    title = "a chat"


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message

    session = factory.SubFactory(ChatSessionFactory)
    role = Message.Role.USER
    content = "hello"
