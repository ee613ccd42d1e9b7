"""Per-tenant limits, so one API key cannot take the whole model queue: turns in flight and requests a minute.

A tenant is the key's owner id when `api_keys` is set, else the client's address. Both limits are
per worker (the queue they protect is). At most MAX_TENANTS tenants are tracked (least recently
seen forgotten first), so a flood of addresses cannot grow this table.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable

from flask import g, request

from .errors import ApiError

MAX_TENANTS = 4096


class _Tenant:
    __slots__ = ("in_flight", "tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.in_flight = 0
        self.tokens = burst
        self.stamp = now


class TenantLimits:
    """Counts each tenant's turns in flight and refills its request bucket (per_minute a minute)."""

    def __init__(self, in_flight: int, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.in_flight, self.per_minute, self.clock = in_flight, per_minute, clock
        self._mu = threading.Lock()
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()

    def _get(self, tenant: str, now: float) -> _Tenant:
        state = self._tenants.pop(tenant, None) or _Tenant(float(self.per_minute), now)
        self._tenants[tenant] = state
        while len(self._tenants) > MAX_TENANTS:
            oldest = next(iter(self._tenants))
            if self._tenants[oldest].in_flight:  # a tenant with turns running is never forgotten
                self._tenants.move_to_end(oldest)
                break
            del self._tenants[oldest]
        return state

    def admit(self, tenant: str) -> None:
        """Count one request; 429 rate_limited with Retry-After when the tenant's bucket is empty."""
        if not self.per_minute:
            return
        with self._mu:
            now = self.clock()
            state = self._get(tenant, now)
            rate = self.per_minute / 60.0
            state.tokens = min(float(self.per_minute), state.tokens + (now - state.stamp) * rate)
            state.stamp = now
            if state.tokens >= 1.0:
                state.tokens -= 1.0
                return
            wait = math.ceil((1.0 - state.tokens) / rate)
        raise ApiError(429, f"more than {self.per_minute} requests a minute from this key; retry in "
                            f"{wait} s", code="rate_limited", retry_after=max(1, wait))

    def hold(self, tenant: str) -> Callable[[], None]:
        """Take one of the tenant's turn slots; returns its release (idempotent); 429 when all are taken."""
        if not self.in_flight:
            return lambda: None
        with self._mu:
            state = self._get(tenant, self.clock())
            if state.in_flight >= self.in_flight:
                raise ApiError(429, f"this key already has {self.in_flight} turn(s) running or "
                                    "waiting; wait for one to finish", code="too_many_in_flight",
                               retry_after=1)
            state.in_flight += 1
        done = threading.Event()

        def release() -> None:
            with self._mu:
                if not done.is_set():
                    done.set()
                    state.in_flight -= 1
        return release


def tenant() -> str:
    """This request's tenant: the key's owner id, else the client's address."""
    owner = g.get("owner")
    return f"key:{owner}" if owner else f"addr:{request.remote_addr}"
