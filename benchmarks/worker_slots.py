"""Worker slots for benchmarks that run many independent heavy jobs: at most `jobs` at once, each child process with
`threads` torch threads, the lowest priority number first (ties: first come)."""

from __future__ import annotations

import heapq
import itertools
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Slots:
    """Shared by threads that each start heavy jobs; `slot()` blocks until a slot is free and the caller is first in
    the queue."""

    def __init__(self, jobs: int, threads: int):
        if jobs < 1 or threads < 1:
            raise ValueError("jobs and threads must be at least 1")
        self.jobs, self.threads, self.free = jobs, threads, jobs
        self.queue: list[tuple[int, int]] = []
        self.tickets, self.cond = itertools.count(), threading.Condition()
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    @contextmanager
    def slot(self, priority: int = 1):
        with self.cond:
            ticket = (priority, next(self.tickets))
            heapq.heappush(self.queue, ticket)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.free > 0 and self.queue[0] == ticket)
            heapq.heappop(self.queue)
            self.free -= 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.free += 1
                self.cond.notify_all()

    def wait_for_queue(self, priority: int, timeout: float) -> None:
        """Block until a job of `priority` waits for a slot (or `timeout` seconds): a caller about to queue jobs of a
        lower priority lets a thread that is still starting its first job take the first free slot."""
        with self.cond:
            self.cond.wait_for(lambda: any(p == priority for p, _ in self.queue), timeout)

    def run(self, command: list[str], priority: int = 1) -> float:
        """Run a child process in a slot (cwd: the repository, `threads` threads); its wall seconds."""
        with self.slot(priority):
            start = time.time()
            subprocess.run(command, cwd=ROOT, env=self.env, check=True)
            return time.time() - start
