"""The chat app's API views, one module per resource."""
