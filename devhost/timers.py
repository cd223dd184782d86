"""Timer triggers on NCRONTAB schedules (UTC), with the host's schedule monitor.

With `useMonitor` the last and next occurrences are kept in a status blob in
`azure-webjobs-hosts` (as the host does), so an occurrence missed while the app was down
fires at start with `past_due` set. `runOnStartup` fires once when the host starts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from azure.core.exceptions import ResourceNotFoundError
from azure.functions.timer import TimerRequest

from core.schedule import CronSchedule
from devhost.app import HostedFunction, resolve_setting_refs
from devhost.storage import HOSTS_CONTAINER, storage_for

log = logging.getLogger("devhost.timers")
# An invocation this much later than its occurrence counts as past due.
_PAST_DUE_GRACE = timedelta(seconds=1)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class TimerTriggerWatcher:
    def __init__(
        self,
        function: HostedFunction,
        *,
        host_id: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.function = function
        self.schedule = CronSchedule.parse(resolve_setting_refs(function.trigger["schedule"]))
        self.use_monitor = bool(function.trigger.get("useMonitor", True))
        self.run_on_startup = bool(function.trigger.get("runOnStartup", False))
        self.clock = clock
        self.storage = storage_for(None)
        self.status_blob = f"timers/{host_id}/Host.Functions.{function.name}/status"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"timer:{function.name}", daemon=True
        )

    def start(self) -> None:
        self.storage.blobs.ensure_container(HOSTS_CONTAINER)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def read_status(self) -> dict[str, str] | None:
        client = self.storage.blob_service.get_blob_client(HOSTS_CONTAINER, self.status_blob)
        try:
            return dict(json.loads(client.download_blob().readall()))
        except ResourceNotFoundError:
            return None

    def _write_status(self, last: datetime, following: datetime) -> None:
        status = {"Last": _iso(last), "Next": _iso(following), "LastUpdated": _iso(self.clock())}
        client = self.storage.blob_service.get_blob_client(HOSTS_CONTAINER, self.status_blob)
        client.upload_blob(json.dumps(status).encode(), overwrite=True)

    def fire(self, occurrence: datetime, *, past_due: bool) -> None:
        """Invoke once for `occurrence` and record it in the schedule monitor."""
        following = self.schedule.next_after(occurrence)
        request = TimerRequest(
            past_due=past_due,
            schedule_status={"Last": _iso(occurrence), "Next": _iso(following)},
            schedule={"AdjustForDST": True},
        )
        try:
            self.function.invoke({self.function.trigger["name"]: request})
        except Exception:
            # Timers are not retried by the host; the next occurrence runs as scheduled.
            log.exception("timer function %s failed", self.function.name)
        if self.use_monitor:
            self._write_status(occurrence, following)

    def _first_occurrence(self) -> datetime:
        now = self.clock()
        if self.use_monitor:
            status = self.read_status()
            if status and "Next" in status:
                recorded = datetime.fromisoformat(status["Next"].replace("Z", "+00:00"))
                if recorded <= now:
                    return recorded  # missed while down: fires now, past due
        return self.schedule.next_after(now)

    def _loop(self) -> None:
        if self.run_on_startup:
            self.fire(self.clock(), past_due=False)
        occurrence = self._first_occurrence()
        while not self._stop.is_set():
            wait_seconds = (occurrence - self.clock()).total_seconds()
            if wait_seconds > 0 and self._stop.wait(wait_seconds):
                return
            late = self.clock() - occurrence > _PAST_DUE_GRACE
            self.fire(occurrence, past_due=late)
            occurrence = self.schedule.next_after(max(occurrence, self.clock()))
