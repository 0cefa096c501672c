urlpatterns: list = [
    # health and stats (workspaces.apis)
]
