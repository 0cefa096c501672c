from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("lifecycle", "0003_archive_job_attempts")]

    operations = [
        migrations.AddField(
            model_name="retentionpolicy",
            name="schedule_fires_days",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
    ]
