"""The release lock for runs on many machines: a Prefect global concurrency limit of one slot
per model and environment.

Runs that share a Prefect server may run on different machines with different workspaces, so
the workspace's file lock cannot see them; the server can. Its slots are leases: a run killed
while holding one loses it when the lease runs out, so nothing stays locked for good. Without
a Prefect server every run shares this machine's workspace and its file lock is the right one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import get_current_settings

from modelyard.config import Settings
from modelyard.deploy.locks import Lock, ReleaseConflict, workspace_lock

# Seconds the lease outlives a holder that stops renewing it (a killed run).
LEASE_SECONDS = 120
# A second release is refused, not queued; this only rides out the server's answer time.
ACQUIRE_SECONDS = 5


def release_lock(settings: Settings) -> Lock:
    """The lock every release of this set-up must take: the Prefect server's when there is one."""
    # A Prefect profile may name the server without the environment doing so.
    shared = settings.api_url or get_current_settings().api.url
    return _prefect_lock if shared else workspace_lock(settings)


def limit_name(key: str) -> str:
    return "modelyard-release:" + key.replace("/", ":")  # Prefect names may not hold '/'


@contextlib.contextmanager
def _prefect_lock(key: str, holder: str) -> Iterator[None]:
    name = limit_name(key)
    _ensure_limit(name)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=ACQUIRE_SECONDS,
                                           lease_duration=LEASE_SECONDS, strict=True))  # fmt: skip
        except TimeoutError:
            raise ReleaseConflict(
                f"another release of {key} is in progress (Prefect concurrency limit {name} is "
                f"taken); {holder} changed nothing: wait for it to finish (`modelyard history`) "
                "and try again"
            ) from None
        yield


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
