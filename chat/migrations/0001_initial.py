# ChatSession, Message and Run, moved here from the agents app (agents.0005_chat_models_moved
# removes them from its state). Only Django's state changes: the tables keep their names
# (db_table), so no row moves. Their content types follow them, so permissions and admin
# history stay attached.

import django.db.models.deletion
import uuid
from django.db import migrations, models


MOVED = ("chatsession", "message", "run")


def content_types_follow(from_label, to_label):
    def move(apps, schema_editor):
        content_type = apps.get_model("contenttypes", "ContentType")
        for model in MOVED:
            if not content_type.objects.filter(app_label=to_label, model=model).exists():
                content_type.objects.filter(app_label=from_label, model=model).update(
                    app_label=to_label
                )

    return move


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('agents', '0003_tools'),
        ('contenttypes', '0002_remove_content_type_name'),
        ('projects', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='ChatSession',
                    fields=[
                        ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                        ('title', models.CharField(blank=True, default='', max_length=200)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('agent', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='sessions', to='agents.agent')),
                        ('project', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='sessions', to='projects.project')),
                    ],
                    options={
                        'db_table': 'agents_chatsession',
                        'ordering': ['-created_at', '-id'],
                    },
                ),
                migrations.CreateModel(
                    name='Message',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('role', models.CharField(choices=[('user', 'User'), ('assistant', 'Assistant'), ('system', 'System')], max_length=16)),
                        ('content', models.TextField(blank=True, default='')),
                        ('status', models.CharField(choices=[('pending', 'Pending'), ('streaming', 'Streaming'), ('done', 'Done'), ('error', 'Error'), ('cancelled', 'Cancelled'), ('superseded', 'Superseded')], default='done', max_length=16)),
                        ('error', models.TextField(blank=True, default='')),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('session', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='messages', to='chat.chatsession')),
                    ],
                    options={
                        'db_table': 'agents_message',
                        'ordering': ['id'],
                    },
                ),
                migrations.CreateModel(
                    name='Run',
                    fields=[
                        ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                        ('status', models.CharField(choices=[('queued', 'Queued'), ('running', 'Running'), ('done', 'Done'), ('error', 'Error'), ('cancelled', 'Cancelled')], default='queued', max_length=16)),
                        ('attempt', models.PositiveIntegerField(default=1)),
                        ('starts', models.PositiveIntegerField(default=0)),
                        ('lease_expires_at', models.DateTimeField(blank=True, null=True)),
                        ('worker', models.CharField(blank=True, default='', max_length=255)),
                        ('error', models.TextField(blank=True, default='')),
                        ('model', models.CharField(blank=True, default='', max_length=200)),
                        ('steps', models.JSONField(blank=True, default=list)),
                        ('depth', models.PositiveSmallIntegerField(default=0)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('dispatched_at', models.DateTimeField(blank=True, null=True)),
                        ('started_at', models.DateTimeField(blank=True, null=True)),
                        ('finished_at', models.DateTimeField(blank=True, null=True)),
                        ('agent', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='runs', to='agents.agent')),
                        ('message', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='run', to='chat.message')),
                        ('parent', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='children', to='chat.run')),
                        ('session', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='runs', to='chat.chatsession')),
                    ],
                    options={
                        'db_table': 'agents_run',
                        'ordering': ['-created_at'],
                    },
                ),
                migrations.AddIndex(
                    model_name='chatsession',
                    index=models.Index(fields=['project', '-created_at'], name='session_project_created'),
                ),
                migrations.AddIndex(
                    model_name='message',
                    index=models.Index(fields=['session', 'id'], name='message_session_id'),
                ),
                migrations.AddIndex(
                    model_name='run',
                    index=models.Index(fields=['status', 'lease_expires_at'], name='run_status_lease'),
                ),
                migrations.AddIndex(
                    model_name='run',
                    index=models.Index(fields=['status', 'created_at'], name='run_status_created'),
                ),
                migrations.AddIndex(
                    model_name='run',
                    index=models.Index(fields=['session', '-created_at'], name='run_session_created'),
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(
            content_types_follow("agents", "chat"), content_types_follow("chat", "agents")
        ),
    ]
