"""Surviving what clusters do to runs: preemption signals, hangs, and the exit codes that tell them apart.

- `StopOnSignal`: Ctrl-C (SIGINT) and SIGTERM (what SLURM and Kubernetes send before they preempt a
  job) ask the loop to finish the current step, save a checkpoint and exit with `EXIT_INTERRUPTED` or
  `EXIT_PREEMPTED`; a second signal stops at once. The loop agrees on the request across ranks
  (`distributed.any_rank`), so all ranks stop after the same step.
- `HangWatchdog`: when no progress is reported for `timeout_s`, the stacks of all threads go to the
  log file (faulthandler) and the process exits with `EXIT_HANG` instead of freezing silently.

- `NonFiniteError`: the run stopped after training.max_nonfinite_steps skipped updates in a row.

Exit codes: 0 done, 2 a user error or a diverged run (a one-line message), 130 stopped by Ctrl-C,
143 stopped by SIGTERM (both saved a checkpoint: resume with `python train.py --resume RUN`), 124 hang.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from pathlib import Path

from dinowm.errors import EXIT_INTERRUPTED, UserError

log = logging.getLogger("dinowm")

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143 (EXIT_INTERRUPTED = 130 = 128 + SIGINT)
EXIT_HANG = 124  # as timeout(1)


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stopped without saving."""


class StopOnSignal:
    """First SIGINT / SIGTERM: finish the current step, save, exit. A second one: stop at once.

    Interrupting inside an optimiser step would save half-updated parameters; a flag checked
    between steps never does. `exit_code` tells which signal asked (EXIT_INTERRUPTED / EXIT_PREEMPTED).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.exit_code = EXIT_INTERRUPTED
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: finishing this step and saving a checkpoint (send it again to abort without saving)", name)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


class HangWatchdog:
    """Exit with EXIT_HANG when `beat()` is not called for `timeout_s` seconds (0 disables it).

    A daemon thread waits on an event; on timeout it writes a message naming the likely causes and
    the stacks of all threads to `log_path` (appended, through faulthandler, which needs no working
    main thread), then ends the process with os._exit: the main thread is stuck, so no exception can
    reach it. Use as a context manager around the loop.
    """

    CAUSES = ("a DataLoader worker that is stuck or died (try data.num_workers = 0)",
              "a collective waiting for a rank that died, hangs or took another code path (check every rank's log)",
              "a stalled file system (dataset, checkpoint or log folder)",
              "a first step that legitimately takes longer, e.g. torch.compile (raise training.hang_timeout_s)")

    def __init__(self, timeout_s: float, log_path: str | Path, rank: int = 0):
        self.timeout_s = float(timeout_s)
        self.log_path = Path(log_path)
        self.rank = rank
        self._beat = threading.Event()
        self._done = threading.Event()
        self._thread = None

    def beat(self) -> None:
        """Progress: restart the countdown."""
        self._beat.set()

    def __enter__(self):
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._beat.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def _watch(self) -> None:
        while not self._done.is_set():
            if self._beat.wait(self.timeout_s):
                self._beat.clear()
                continue
            if self._done.is_set():
                return
            self._fire()

    def _fire(self) -> None:
        message = (f"rank {self.rank}: no training progress for {self.timeout_s:g} s (training.hang_timeout_s); "
                   f"likely causes: {'; '.join(self.CAUSES)}. Stacks of all threads follow in {self.log_path}; "
                   f"exiting with code {EXIT_HANG}. Resume from the last checkpoint with: python train.py --resume RUN")
        log.error(message)
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(f"\n{time.strftime('%H:%M:%S')} hang watchdog (rank {self.rank}): stacks of all threads:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.flush()
        finally:
            os._exit(EXIT_HANG)
