"""Executing the tool calls agents make while they answer, on workers: built-in tools
(their own context), HTTP endpoints, MCP servers, and the kinds other apps register
(`registry`: an agent asking another is chat's). What a tool is, and its validation,
is the agents catalogue's (agents.tool_validation)."""
