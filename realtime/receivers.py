"""A web process's event streams and waiting requests share one hub per event loop,
closed with the loop; its streams end as soon as the process is told to stop."""

from common.lifecycle import on_loop_shutdown, on_server_stopping

from .streamhub import close_hub, stop_hub_streams

on_loop_shutdown(close_hub)
on_server_stopping(stop_hub_streams)
