from celery import shared_task

from .audit import audit_purge


@shared_task(name="governance.purge_audit")
def purge_audit() -> int:
    return audit_purge()
