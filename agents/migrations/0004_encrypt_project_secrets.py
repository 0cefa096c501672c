"""Project secrets encrypted at rest: the field becomes EncryptedTextField, and the rows
stored in clear before it are encrypted in place (a row that already decrypts is left)."""

from django.db import migrations

import governance.secrets


def encrypt_clear_rows(apps, schema_editor):
    from governance.secrets import secret_encrypt, secret_readable

    # Raw SQL: the model's field would try to decrypt the clear values it reads.
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT id, value FROM agents_projectsecret")
        rows = cursor.fetchall()
        for row_id, value in rows:
            if value and not secret_readable(value):
                cursor.execute(
                    "UPDATE agents_projectsecret SET value = %s WHERE id = %s",
                    [secret_encrypt(value), row_id],
                )


def decrypt_rows(apps, schema_editor):
    from governance.secrets import secret_decrypt

    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT id, value FROM agents_projectsecret")
        for row_id, value in cursor.fetchall():
            if value:
                cursor.execute(
                    "UPDATE agents_projectsecret SET value = %s WHERE id = %s",
                    [secret_decrypt(value), row_id],
                )


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0003_tools"),
    ]

    operations = [
        migrations.AlterField(
            model_name="projectsecret",
            name="value",
            field=governance.secrets.EncryptedTextField(),
        ),
        migrations.RunPython(encrypt_clear_rows, decrypt_rows),
    ]
