"""A pool of environments for evaluation and rollouts: N episodes in flight, one per environment.

Threads suffice: each environment's work happens in its own backend process (a JVM, a database server) and the
Python side waits on sockets, which releases the GIL. The pool only hands out environments and collects results;
restarting a dead backend is the environment's job (see ``SciWorldEnv``), and a failure it cannot repair reaches the
caller as an ``EnvironmentCrashed`` value, never as a silently wrong reward.
"""

from __future__ import annotations

import atexit
import queue
import traceback
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from hpl_lightning.envs.base import Environment, EnvironmentCrashed

E = TypeVar("E", bound=Environment)
T = TypeVar("T")
R = TypeVar("R")


def _as_crash(error: Exception) -> EnvironmentCrashed:
    """An unexpected exception of an environment call as the episode's failure: type, message and raising line."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    crash = EnvironmentCrashed(f"{type(error).__name__}{where}: {error}")
    crash.__cause__ = error
    return crash


class EnvPool(Generic[E]):
    """``size`` environments built by ``make_env``; closed on ``close``, on leaving ``with``, and at interpreter exit.

    Two ways to use it (one at a time):
    - ``map(fn, items)``: whole episodes (gold paths, rollouts); ``fn(env, item)`` runs on whichever env is free.
    - ``each({slot: fn})``: one call per env slot, concurrently; the lock-step form a batched generation loop needs
      (generate the next action of every in-flight episode in one batch, then step all their envs at once).
    """

    def __init__(self, make_env: Callable[[], E], size: int = 1):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="env-pool")
        self.envs: list[E] = []
        self._closed = False
        atexit.register(self.close)
        futures = [self._executor.submit(make_env) for _ in range(size)]  # JVMs start in parallel
        wait(futures)
        self.envs = [f.result() for f in futures if f.exception() is None]
        if len(self.envs) < size:
            self.close()
            raise next(f.exception() for f in futures if f.exception() is not None)

    @property
    def size(self) -> int:
        return len(self.envs)

    def map(self, fn: Callable[[E, T], R], items: Iterable[T]) -> Iterator[tuple[T, R | EnvironmentCrashed]]:
        """Yields ``(item, fn(env, item))`` in input order; a crash is yielded, not raised.

        Input order, not completion order (which depends on the pool size and the machine's load): records written
        from the results come out the same on every run, so seeded shuffles downstream see the same list. An episode
        that finishes early waits for those before it. Any other exception is a bug and propagates. Leaving the loop
        early cancels the items not yet started.
        """
        free: queue.SimpleQueue[E] = queue.SimpleQueue()
        for env in self.envs:
            free.put(env)

        def run(item: T) -> R:
            env = free.get()  # never blocks long: as many threads as envs
            try:
                return fn(env, item)
            finally:
                free.put(env)

        futures: list[tuple[T, Future[R]]] = [(item, self._executor.submit(run, item)) for item in items]
        try:
            for item, future in futures:
                try:
                    yield item, future.result()
                except EnvironmentCrashed as e:
                    yield item, e
        finally:
            for _, future in futures:
                future.cancel()

    def each(self, calls: Mapping[int, Callable[[E], R]]) -> dict[int, R | EnvironmentCrashed]:
        """Runs ``calls[slot](self.envs[slot])`` for every given slot concurrently; returns results by slot.

        Any exception of one call (``MemoryError``, a bug an agent's action hits) ends only that slot's episode: it
        comes back as an ``EnvironmentCrashed`` naming the exception and where it was raised, so the episode loops
        record it as that episode's failure and go on."""
        futures = {slot: self._executor.submit(fn, self.envs[slot]) for slot, fn in calls.items()}
        out: dict[int, R | EnvironmentCrashed] = {}
        for slot, future in futures.items():
            try:
                out[slot] = future.result()
            except EnvironmentCrashed as e:
                out[slot] = e
            except Exception as e:
                out[slot] = _as_crash(e)
        return out

    def close(self) -> None:
        """Stops every environment's processes; calls still in flight then fail fast with ``EnvironmentCrashed``."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for env in self.envs:
            env.close()

    def __enter__(self) -> "EnvPool[E]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
