"""Processes `aimesh up` starts (Envoy, model servers) stop when it dies, even by SIGKILL."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def terminate_with_parent() -> None:
    """A preexec_fn: the kernel sends SIGTERM (a clean drain) to the child once its parent
    is gone. Model servers run in their own session so that Ctrl-C reaches only `aimesh
    up`, which drains them in order; without this a killed `aimesh up` would orphan them."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
