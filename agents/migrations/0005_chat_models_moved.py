# ChatSession, Message and Run moved to the chat app (chat.0001_initial). Only Django's
# state changes here: the tables stay where they are (the models keep their db_table), so
# no row moves.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('agents', '0004_encrypt_project_secrets'),
        ('chat', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveField(
                    model_name='run',
                    name='session',
                ),
                migrations.RemoveField(
                    model_name='message',
                    name='session',
                ),
                migrations.RemoveField(
                    model_name='run',
                    name='message',
                ),
                migrations.RemoveField(
                    model_name='run',
                    name='agent',
                ),
                migrations.RemoveField(
                    model_name='run',
                    name='parent',
                ),
                migrations.DeleteModel(
                    name='ChatSession',
                ),
                migrations.DeleteModel(
                    name='Message',
                ),
                migrations.DeleteModel(
                    name='Run',
                ),
            ],
            database_operations=[],
        ),
    ]
