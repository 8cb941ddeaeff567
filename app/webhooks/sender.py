"""Sends the outbox's messages: claim one, POST it, record the answer; again until none is due.

Runs as a thread in the API process and in every worker (`start`): claims are conditional, so they
never send one message at once, and a message survives any of them dying (its hold lapses and
another sender tries again, with the same delivery id). Training runs in its own process, so a slow
receiver never holds it up.

A 2xx answer delivers the message. Anything else (an error status, a redirect, which is never
followed, a timeout, a refused connection) is tried again after an exponential backoff with jitter,
up to `webhook_max_attempts`, then the message is failed with its last error. A URL the allow-list
does not allow any more is failed at once. The job's events say when its message was delivered or
finally failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session

from app.db import session_scope
from app.settings import Settings
from app.webhooks import outbox, signing, targets
from app.webhooks.models import DeliveryState
from app.webhooks.payload import render

logger = logging.getLogger(__name__)

# A job event about a message: (session, job_id, message, level, data). Given by the composition
# root (`app.jobs.lifecycle.note`): the webhooks area does not import jobs.
NoteJob = Callable[[Session, str, str, str, dict[str, Any]], None]
USER_AGENT = "sgjobs-webhooks/1"


def hold_seconds(settings: Settings) -> float:
    """How long a claim holds a message: one attempt's connect, write and read timeouts, the DNS
    lookup, and a margin; past it another sender may try."""
    return 4 * settings.webhook_timeout_seconds + 30.0


class Sender:
    """Sends due messages with one HTTP client (no redirects, no proxies from the environment)."""

    def __init__(self, settings: Settings, *, note: NoteJob, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.note = note
        self.client = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            # No connection reuse: a pooled connection is keyed by address, not by the host name
            # it was opened (and its certificate checked) for.
            limits=httpx.Limits(max_keepalive_connections=0),
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self.client.close()

    def send_due(self, *, limit: int = 100) -> int:
        """Send messages while any is due, at most `limit`; returns how many attempts were made."""
        made = 0
        while made < limit:
            with session_scope(self.settings.database_url) as session:
                claimed = outbox.claim_due(session, limit=1, hold_seconds=hold_seconds(self.settings))
            if not claimed:
                break
            self.attempt(claimed[0])
            made += 1
        return made

    def attempt(self, message: outbox.Claimed) -> DeliveryState | None:
        """One attempt at a claimed message, and its result recorded; returns the new state."""
        settings = self.settings
        host = urlsplit(message.url).hostname or "?"
        status_code: int | None = None
        retry = True
        try:
            target = targets.check_target(settings, message.url)
            status_code = self._post(message, target)
            error = None if 200 <= status_code < 300 else self._status_error(status_code)
        except targets.Refused as exc:
            error, retry = str(exc), False
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with session_scope(settings.database_url) as session:
            if error is None:
                assert status_code is not None
                if not outbox.mark_delivered(
                    session, delivery_id=message.id, attempt=message.attempt, status_code=status_code
                ):
                    return None
                logger.info("webhook %s for job %s delivered to %s", message.id, message.job_id, host)
                self.note(
                    session,
                    message.job_id,
                    f"webhook {message.event} delivered to {host} "
                    f"(HTTP {status_code}, attempt {message.attempt})",
                    "info",
                    {"delivery_id": message.id, "attempts": message.attempt, "status_code": status_code},
                )
                return DeliveryState.delivered
            last = not retry or message.attempt >= settings.webhook_max_attempts
            state = outbox.mark_failed_attempt(
                session,
                delivery_id=message.id,
                attempt=message.attempt,
                error=error,
                status_code=status_code,
                retry_in=None
                if last
                else outbox.backoff_seconds(
                    message.attempt,
                    base=settings.webhook_backoff_seconds,
                    cap=settings.webhook_backoff_max_seconds,
                ),
            )
            logger.warning(
                "webhook %s for job %s to %s, attempt %d: %s%s",
                message.id,
                message.job_id,
                host,
                message.attempt,
                error,
                "; giving up" if last else "",
            )
            if state == DeliveryState.failed:
                self.note(
                    session,
                    message.job_id,
                    f"webhook {message.event} to {host} failed after {message.attempt} attempt(s): {error}",
                    "warning",
                    {"delivery_id": message.id, "attempts": message.attempt, "status_code": status_code},
                )
            return state

    def _post(self, message: outbox.Claimed, target: targets.Target) -> int:
        body, timestamp = render(
            self.settings, delivery_id=message.id, event=message.event, recorded=message.payload
        )
        url = httpx.URL(message.url)
        headers = {
            # The URL's own host name, while the connection goes to the address that was checked.
            "Host": url.netloc.decode("ascii"),
            "Content-Type": "application/json",
            signing.SIGNATURE_HEADER: signing.sign(signing.secret(self.settings), body),
            signing.DELIVERY_HEADER: message.id,
            signing.EVENT_HEADER: message.event,
            signing.TIMESTAMP_HEADER: str(timestamp),
        }
        extensions = {"sni_hostname": target.host} if url.scheme == "https" else {}
        # Host and port as checked, whatever another URL parser would make of the text.
        pinned = url.copy_with(host=target.address, port=target.port)
        # Streamed and not read: a receiver's answer body, however large, is not loaded.
        with self.client.stream(
            "POST", pinned, content=body, headers=headers, extensions=extensions
        ) as response:
            return response.status_code

    @staticmethod
    def _status_error(status_code: int) -> str:
        if 300 <= status_code < 400:
            return f"HTTP {status_code} (redirects are not followed; give the final URL)"
        return f"HTTP {status_code}"


def run_forever(settings: Settings, *, note: NoteJob, stop: threading.Event) -> None:
    """Send due messages every `webhook_poll_seconds` until `stop` is set."""
    sender = Sender(settings, note=note)
    try:
        while not stop.is_set():
            try:
                sender.send_due()
            except Exception:
                logger.exception("sending webhooks failed")
            stop.wait(settings.webhook_poll_seconds)
    finally:
        sender.close()


def start(settings: Settings, *, note: NoteJob, stop: threading.Event) -> threading.Thread:
    """The sender as a daemon thread."""
    thread = threading.Thread(
        target=run_forever,
        args=(settings,),
        kwargs={"note": note, "stop": stop},
        name="sgjobs-webhooks",
        daemon=True,
    )
    thread.start()
    return thread
