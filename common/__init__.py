"""Common: the small pieces every app shares and no app owns (Redis clients, process-wide
singletons, `model_update`, the API's base serializers and pagination, shutdown hooks).
It imports nothing of ours."""
