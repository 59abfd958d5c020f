"""Getting encoded records to the service, or keeping them until it answers: the sender thread's work.

    POST a batch
      ok         counted as sent
      422 / 4xx  the records the service names (`records.N...`) go to on_error, the rest are resent;
                 when it names none, the batch is bisected down to the bad record
      413        bisected
      transient  connect error, timeout, 5xx, 429, 404: retried with exponential backoff and jitter,
                 or after Retry-After; once the service has been unreachable for `spool_after`
                 seconds the batch goes to the spool, and until a probe succeeds new batches go
                 straight there. A 404 is what Ray Serve's proxy answers while the app redeploys;
                 it is passed to on_error once per stretch, as a RouteNotFound warning
      401/403    the sender stops posting; everything goes to the spool; flush/close raise
      405        the same: this base URL's route takes no POST, nothing will ever be accepted
    then one chunk of the spool is replayed, while the service answers.

Records are bytes here (one JSON line each), the form they have in the spool, so a batch moves
between the network and the disk without being encoded twice.
"""
from __future__ import annotations

import logging
import threading
import time

from ray_app.client.errors import AuthError, ClientError, RecordDropped, RecordRejected, RouteNotFound
from ray_app.client.reporting import Reporter
from ray_app.client.spool import Segment, Spool
from ray_app.client.transport import Outcome, Transport, backoff

logger = logging.getLogger("flywheel.client")


class Delivery:
    def __init__(self, transport: Transport, spool: Spool | None, reporter: Reporter, *, batch_size: int,
                 spool_after: float, max_backoff: float, stop: threading.Event):
        self.transport, self.spool, self.reporter = transport, spool, reporter
        self._batch_size, self._spool_after, self._max_backoff = batch_size, spool_after, max_backoff
        self._stop = stop  # set by close(): stop waiting between retries
        self.fatal: ClientError | None = None
        self.segment: Segment | None = None  # the spool segment being replayed
        self.spool_pending = spool is not None  # a previous run may have left segments
        self._down_until, self._probe_failures = 0.0, 0
        self._route_missing = False  # a RouteNotFound was reported and no post has succeeded since

    # ---- posting ----

    def deliver(self, lines: list[bytes], *, from_spool: bool) -> bool:
        """Post until every line is acknowledged or rejected (True); else park the rest (False)."""
        if self.fatal is not None or (self.spool is not None and time.monotonic() < self._down_until):
            return self.park(lines, from_spool)
        parts = [lines]
        while parts:
            part = parts.pop()
            outcome = self._post(part, patient=self._down_until == 0.0)
            if outcome.kind == "ok":
                self._recovered()
                self.reporter.count("sent", len(part))
            elif outcome.kind == "invalid" and outcome.bad:
                self.reporter.report("rejected", [part[i] for i in sorted(outcome.bad)],
                                     [RecordRejected(msg, status=outcome.status, field=fld) for msg, fld in
                                      (outcome.bad[i] for i in sorted(outcome.bad))])
                rest = [line for i, line in enumerate(part) if i not in outcome.bad]
                if rest:
                    parts.append(rest)
            elif outcome.kind in ("invalid", "too_large"):
                if len(part) == 1:
                    self.reporter.report("rejected", part, RecordRejected(outcome.message, status=outcome.status))
                else:  # the service named no record: halve until the bad one is alone
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]
            else:
                if outcome.kind == "fatal":
                    self.fatal = AuthError(outcome.message, status=outcome.status)
                    logger.error("flywheel client stopped sending: %s", outcome.message)
                    self.reporter.call(None, self.fatal)
                else:
                    self._mark_down(outcome)
                return self.park([line for p in [part, *parts] for line in p], from_spool)
        return True

    def _post(self, part: list[bytes], *, patient: bool) -> Outcome:
        """One POST, retried on transient failures while patient and within spool_after."""
        first_failure, attempt = time.monotonic(), 0
        while True:
            outcome = self.transport.post_batch(part)
            if outcome.status == 404:
                self._route_not_found(outcome)
            if outcome.kind != "transient" or self._stop.is_set():
                return outcome
            delay = outcome.retry_after
            if delay is None:
                delay = backoff(self._max_backoff, attempt)
            give_up_at = first_failure + self._spool_after
            if self.spool is not None and (not patient or time.monotonic() + delay > give_up_at):
                return outcome
            attempt += 1
            self.reporter.count("retried", len(part))
            logger.debug("retrying %d records in %.2fs: %s", len(part), delay, outcome.message)
            if self._stop.wait(delay):
                return outcome

    def park(self, lines: list[bytes], from_spool: bool) -> bool:
        """Keep undelivered lines: spooled ones stay in their segment; others go to the spool or are dropped."""
        if from_spool or not lines:
            return False
        if self.spool is None:
            self.reporter.drop(lines, self.fatal or RecordDropped("service unreachable at close and no spool_dir"))
            return False
        try:
            self.spool.append(lines)
        except OSError as exc:
            self.reporter.drop(lines, RecordDropped(f"spool write failed: {exc}"))
            return False
        self.reporter.count("spooled", len(lines))
        self.spool_pending = True
        return False

    # ---- replaying ----

    def replay_step(self, *, queue_short: bool) -> bool:
        """Send the next chunk of the oldest spool segment while the service answers.

        `queue_short`: the live queue holds less than a batch, so this client's own active
        segment may be sealed and replayed too."""
        if self.spool is None or self.fatal is not None or time.monotonic() < self._down_until:
            return False
        segment = self.segment
        if segment is None:
            if not self.spool_pending:
                return False
            segment = self.spool.claim()
            if segment is None and self.spool.active_bytes() and queue_short:
                self.spool.seal()
                segment = self.spool.claim()
            if segment is None:
                self.spool_pending = self.spool.active_bytes() > 0
                return False
            self.segment = segment
            self.reporter.drop(segment.corrupt, RecordDropped(f"torn line in spool segment {segment.path.name}"))
        chunk = segment.lines[segment.offset:segment.offset + self._batch_size]
        if chunk:
            if not self.deliver(chunk, from_spool=True):
                return False
            segment.offset += len(chunk)
            self.reporter.count("replayed", len(chunk))
        if segment.offset >= len(segment.lines):
            self.spool.release(segment, done=True)
            self.segment = None
        return True

    def release_segment(self) -> None:
        """At stop: unlock the segment being replayed; the next client resumes it from the start."""
        if self.segment is not None:
            self.spool.release(self.segment, done=False)
            self.segment = None

    def settled(self) -> bool:
        """No segment in replay and nothing on disk waiting."""
        return self.segment is None and (self.spool is None or not self.spool.has_pending())

    # ---- the service's state ----

    def idle_wait(self, flush_interval: float) -> float:
        """How long the sender may sleep: until the next probe when the spool waits on a down service."""
        if self.spool_pending and self._down_until:
            return max(0.0, min(flush_interval, self._down_until - time.monotonic()))
        return flush_interval

    def _mark_down(self, outcome: Outcome) -> None:
        self._probe_failures += 1
        delay = outcome.retry_after
        if delay is None:
            delay = backoff(self._max_backoff, self._probe_failures)
        self._down_until = time.monotonic() + delay
        logger.warning("flywheel service unreachable (%s); spooling, next try in %.1fs", outcome.message, delay)

    def _recovered(self) -> None:
        if self._down_until:
            logger.info("flywheel service reachable again; replaying the spool")
        self._down_until, self._probe_failures = 0.0, 0
        self._route_missing = False

    def _route_not_found(self, outcome: Outcome) -> None:
        if self._route_missing:
            return
        self._route_missing = True
        self.reporter.call(None, RouteNotFound(
            f"{outcome.message}; keeping the records and retrying (Serve answers 404 while the app "
            f"redeploys; if this lasts, check the base URL {self.transport.base_url!r})"))
