"""Work around a kafka-python 3.0 group-join race that can keep a consumer group rebalancing.

kafka-python 3.0 runs the JoinGroup -> SyncGroup round trip as a task on its IO thread and
caches it across ``poll`` calls, so that a short poll does not send JoinGroup twice. But when
the task finishes while no ``poll`` awaits it (the member is busy between polls, as a worker
is while it runs a batch), the next ``poll`` sees a finished task and starts a new one: the
assignment it carried is dropped. When that member leads the group its new JoinGroup starts
another rebalance; the followers rejoin, the leader's next task again finishes while its
caller is busy, and the group can rebalance for as long as the members poll that way (seen
in CI: two members of a group still not split after 30 s).

``apply`` completes a task that finished successfully exactly as the library's own loop would
have (same state changes, same ``_on_join_complete_async``) before that loop runs. It patches
only a library whose ``join_group_async`` has the pattern, so a fixed release is left alone.
"""

from __future__ import annotations

import inspect
import logging
import threading

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet


def apply() -> bool:
    """Patch ``BaseCoordinator.join_group_async`` once; True when the patch is in place."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _patch()
        return _applied


def _patch() -> bool:
    from kafka.coordinator.base import BaseCoordinator

    try:
        source = inspect.getsource(BaseCoordinator.join_group_async)
    except (AttributeError, OSError, TypeError):
        return False
    if "self._join_task.is_done" not in source or not hasattr(BaseCoordinator, "_on_join_complete_async"):
        return False
    original = BaseCoordinator.join_group_async

    async def join_group_async(self, timeout_ms=None):
        task = self._join_task
        if task is not None and task.succeeded() and self.rejoining and _still_in_that_generation(self):
            await _complete_join(self, task.value)
        return await original(self, timeout_ms)

    BaseCoordinator.join_group_async = join_group_async
    logger.debug("kafka-python join_group_async patched: a join that finished between polls is kept")
    return True


def _still_in_that_generation(coordinator) -> bool:
    """Nothing reset the member since its join finished (a reset leaves it UNJOINED, generation -1):
    otherwise the finished join is stale and the library's fresh JoinGroup is right."""
    from kafka.coordinator.base import Generation
    from kafka.structs import MemberState

    return (coordinator.state is MemberState.REBALANCING
            and coordinator._generation.generation_id != Generation.NO_GENERATION.generation_id)


async def _complete_join(coordinator, assignment: bytes) -> None:
    """The success path of kafka-python's ``join_group_async``, for a task nobody awaited."""
    from kafka.structs import MemberState

    coordinator._join_task = None
    with coordinator._lock:
        coordinator.rejoining = False
        coordinator.rejoin_needed = False
        coordinator.state = MemberState.STABLE
        coordinator._enable_heartbeat()
    generation = coordinator._generation
    await coordinator._on_join_complete_async(generation.generation_id, generation.member_id,
                                              generation.protocol, assignment)
