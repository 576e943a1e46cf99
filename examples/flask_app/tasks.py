"""The work the app hands to RQ. Workers import it by name; the web process never runs it."""

from rq import get_current_job


def send_welcome_email(address: str) -> str:
    job = get_current_job()
    if job is not None:  # record delivery so the example's test can count it
        job.connection.rpush("example:sent", address)
    return f"welcome mail to {address}"
