"""The agent runtime: LLM providers, embeddings, the vector store and chat event streams.

Providers, embeddings and the vector store are opened only by Celery workers; web
processes use `streams` (Redis) alone.
"""
