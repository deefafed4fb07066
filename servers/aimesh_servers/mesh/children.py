"""Processes `aimesh up` starts (Envoy, model servers) stop when it dies, even by SIGKILL."""

from __future__ import annotations

import shutil


def terminate_with_parent(command: list[str]) -> list[str]:
    """`command` run so that the kernel sends it SIGTERM (a clean drain) once its parent is
    gone. Model servers run in their own session so that Ctrl-C reaches only `aimesh up`,
    which drains them in order; without this a killed `aimesh up` would orphan them.
    util-linux `setpriv` sets the signal and execs: a preexec_fn would run Python in a
    child forked from a threaded process (gRPC), which can deadlock."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command
