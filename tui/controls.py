"""The commands another thread gives the loop, and the exceptions that end or skip its work.

Commands only set flags (any thread, any time); the loop polls them at least every 0.5 s while it waits and every
0.1 s while a run trains or the LLM thinks, so a command never waits for the loop and the loop never blocks on one.
"""

import threading
import time


class FatalError(RuntimeError):
    """Stops the loop; the message is one line that says what is wrong and what to do."""


class StopRequested(Exception):
    """A stop/abort command arrived before the loop started."""


class SkipExperiment(Exception):
    def __init__(self, reason: str, outage: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.outage = outage


class Controls:
    def __init__(self):
        self.stop_flag = threading.Event()
        self.abort_flag = threading.Event()
        self.skip_flag = threading.Event()
        self.pause_flag = threading.Event()
        self.resume_now = threading.Event()
        self.wake = threading.Event()

    def pause(self) -> None:
        self.pause_flag.set()
        self.wake.set()

    def resume(self) -> None:
        self.pause_flag.clear()
        self.resume_now.set()
        self.wake.set()

    def stop(self) -> None:
        self.stop_flag.set()
        self.wake.set()

    def abort(self) -> None:
        self.abort_flag.set()
        self.stop_flag.set()
        self.wake.set()

    def skip(self) -> None:
        self.skip_flag.set()
        self.wake.set()

    def cancel_reason(self, include_stop: bool = True) -> str | None:
        """Why the work in progress should end now: "abort", "skip", "stop" (when include_stop), or None."""
        if self.abort_flag.is_set():
            return "abort"
        if self.skip_flag.is_set():
            return "skip"
        if include_stop and self.stop_flag.is_set():
            return "stop"
        return None

    def wait(self, seconds: float, until_resume: bool = False) -> bool:
        """Sleep interruptibly; False when a command asks to give up (or resume, with until_resume)."""
        end = time.monotonic() + seconds
        while True:
            if self.cancel_reason() or (until_resume and self.resume_now.is_set()):
                return False
            remaining = end - time.monotonic()
            if remaining <= 0:
                return True
            self.wake.wait(min(remaining, 0.5))
            self.wake.clear()

    def wait_while_paused(self) -> None:
        while self.pause_flag.is_set() and not self.stop_flag.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
        self.resume_now.clear()
