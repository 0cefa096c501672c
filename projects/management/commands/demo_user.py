from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create the demo user (idempotent) and print its API token."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default="demo-password")

    def handle(self, *args, username: str, password: str, **options):
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(password)
            user.save(update_fields=["password"])
        token, _ = Token.objects.get_or_create(user=user)
        verb = "Created" if created else "Found"
        self.stdout.write(f"{verb} user {username!r} (password {password!r} if newly created).")
        self.stdout.write(f"API token: {token.key}")
        self.stdout.write(
            f'  curl -H "Authorization: Token {token.key}" http://127.0.0.1:8000/my/projects/'
        )
