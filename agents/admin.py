from django.contrib import admin

from .models import Agent, ChatSession, Message


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ("name", "project", "model", "created_at", "updated_at")
    list_filter = ("model", "created_at")
    search_fields = ("name", "system_prompt", "project__name", "id")
    list_select_related = ("project",)
    readonly_fields = ("id", "created_at", "updated_at")
    raw_id_fields = ("project",)


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "status", "content", "created_at")
    readonly_fields = ("created_at",)


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ("__str__", "project", "agent", "created_at")
    list_filter = ("created_at",)
    search_fields = ("title", "project__name", "agent__name", "id")
    list_select_related = ("project", "agent")
    readonly_fields = ("id", "created_at")
    raw_id_fields = ("project", "agent")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "session", "role", "status", "short_content", "created_at")
    list_filter = ("role", "status", "created_at")
    search_fields = ("content", "session__id")
    list_select_related = ("session",)
    raw_id_fields = ("session",)

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]
