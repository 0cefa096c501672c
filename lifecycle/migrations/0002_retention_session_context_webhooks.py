from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("lifecycle", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="retentionpolicy",
            name="session_context_days",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="retentionpolicy",
            name="webhook_deliveries_days",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
