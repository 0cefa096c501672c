"""A web process's event streams and waiting requests share one hub per event loop,
closed with the loop."""

from common.lifecycle import on_loop_shutdown

from .streamhub import close_hub

on_loop_shutdown(close_hub)
