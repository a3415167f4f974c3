"""The leases held, by token, and indexed by job, by holding connection and by
uid, so that the registry's bulk operations (`release_job`, a closed
connection, a uid's leases) touch only what they must. Pure."""

from __future__ import annotations

import collections
from typing import TypeVar

from supervisor.core.states import Lease

K = TypeVar("K")


class LeaseIndex:
    """Every lease held, and the indexes derived from them.

    The indexes are dicts used as sets that keep acquisition order, so the
    leases of a job, connection or uid come out in the order they were taken.
    Only the registry changes it; every method is O(1).
    """

    def __init__(self) -> None:
        self.by_token: dict[str, Lease] = {}
        self.by_job: dict[str, dict[str, None]] = {}
        self.by_owner: dict[int, dict[str, None]] = {}
        self.by_uid: dict[int, dict[str, None]] = {}
        # How many leases each adapter has.
        self.count_by_adapter: collections.Counter[str] = collections.Counter()

    def add(self, lease: Lease) -> None:
        """Hold `lease` and index it by its job, uid and owner (if any)."""
        token = lease.token
        self.by_token[token] = lease
        self.by_job.setdefault(lease.job, {})[token] = None
        self.by_uid.setdefault(lease.uid, {})[token] = None
        self.count_by_adapter[lease.adapter] += 1
        if lease.owner is not None:
            self.by_owner.setdefault(lease.owner, {})[token] = None

    def remove(self, lease: Lease) -> None:
        """Forget a held lease and every index entry of it. KeyError if not held."""
        token = lease.token
        del self.by_token[token]
        discard_from(self.by_job, lease.job, token)
        discard_from(self.by_uid, lease.uid, token)
        self.count_by_adapter[lease.adapter] -= 1
        if not self.count_by_adapter[lease.adapter]:
            del self.count_by_adapter[lease.adapter]
        if lease.owner is not None:
            discard_from(self.by_owner, lease.owner, token)

    def set_owner(self, lease: Lease, owner: int | None) -> None:
        """Bind a held lease to connection `owner` (None: to no connection)."""
        if lease.owner is not None:
            discard_from(self.by_owner, lease.owner, lease.token)
        lease.owner = owner
        if owner is not None:
            self.by_owner.setdefault(owner, {})[lease.token] = None

    def of_job(self, job: str) -> list[Lease]:
        """Every lease of `job`, in the order they were taken."""
        return [self.by_token[token] for token in self.by_job.get(job, ())]

    def of_uid(self, uid: int) -> list[Lease]:
        """Every lease taken by `uid`, in the order they were taken."""
        return [self.by_token[token] for token in self.by_uid.get(uid, ())]

    def of_owner(self, connection: int) -> list[Lease]:
        """Every lease bound to `connection`, in the order they were taken
        (a copy: the caller may change owners while walking it)."""
        return [self.by_token[token] for token in self.by_owner.get(connection, ())]


def discard_from(index: dict[K, dict[str, None]], key: K, item: str) -> None:
    """Remove `item` from the set `index[key]`, and the set once it is empty."""
    members = index.get(key)
    if members is not None:
        members.pop(item, None)
        if not members:
            del index[key]
