from django.apps import AppConfig


class ToolsConfig(AppConfig):
    """Executing the tool calls a model asks for, on workers: built-in tools, HTTP
    endpoints, MCP servers, and the kinds other apps register (`tools.registry`)."""

    name = "tools"
