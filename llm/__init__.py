"""Clients of LLM endpoints: the providers agents answer through (`providers`, with the
types callers use in `types`) and the OpenAI-compatible client (`openai_api`), which only
workers load."""
