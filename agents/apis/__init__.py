"""The agents app's API views, one module per resource."""
