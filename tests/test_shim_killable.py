"""A caller killed while its call waits on BACKING dies at once, through the overlay too.

pyfuse3 takes no FUSE_INTERRUPT, and the kernel lets a killed caller go only
once its request, read by the server, is answered: a `kill -9` of a process
whose listing, write, truncation or O_DIRECT read through the overlay waited
on BACKING (data never staged on scoutfs) did nothing until BACKING
answered, for ever if it never did.  ``tests/held_listing_fs.py`` is BACKING,
holding the call until the test lets it go; users are real uids, the shim a
real mount.  Each test here failed before the fix (the killed caller was not
reaped while BACKING held its call).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from shim_support import START_TIMEOUT, run_shim
from test_shim_attacks import (
    _HELD_CALLS,
    _attacker_proc,
    _held_listing_backing,
    _holder_says,
    _lease_breaking,
    _lease_holder,
    _user_proc,
)
from test_shim_security import ATTACKER, top  # noqa: F401

# what a user does to `held` or `slow`, and what BACKING then says.  Not
# among them: a buffered read, which the kernel sends as readahead that the
# reader does not wait for (it waits for the page, and a kill ends that: it
# died at once before the fix too).
_KILLABLE_CALLS = {
    **{call: code_started[:2] for call, code_started in _HELD_CALLS.items() if call != "read"},
    # the kernel sends a read of a file opened O_DIRECT (or one faulted in
    # without readahead) as a call the reader waits for
    "direct_read": (
        "print(os.read(os.open(SLOW, os.O_RDONLY | os.O_DIRECT), 4096))",
        "reading slow\n",
    ),
}


def _direct_read(path: Path) -> str:
    return f"import os\nprint(os.read(os.open({str(path)!r}, os.O_RDONLY | os.O_DIRECT), 4096))"


# a process that dies as Ctrl-C kills it: SIGINT's default action
_DEFAULT_SIGINT = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n"


def _reaped(proc: subprocess.Popen[str]) -> int | None:
    """``proc``'s exit status once it is reaped; None if it still runs after
    START_TIMEOUT (a killed caller held until BACKING answers)."""
    try:
        return proc.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None


def _served_to_another_user(mnt: Path) -> str:
    """What another user's stat and read of ``f`` (cached on BACKING) print."""
    other = _user_proc(
        ["-c", f"import os\nos.stat({str(mnt / 'f')!r})\nprint(open({str(mnt / 'f')!r}).read())"],
        uid=ATTACKER + 1,
    )
    try:
        out, err = other.communicate(timeout=START_TIMEOUT)
    finally:
        other.kill()
        other.wait()
    return out + err


def _call_code(mnt: Path, code: str, prefix: str = "") -> str:
    return f"import os\n{prefix}SLOW = {str(mnt / 'slow')!r}\nHELD = {str(mnt / 'held')!r}\n{code}"


@pytest.mark.parametrize(
    ("call", "sig"),
    [(call, signal.SIGKILL) for call in sorted(_KILLABLE_CALLS)] + [("direct_read", signal.SIGINT)],
)
def test_a_caller_killed_while_its_call_waits_on_backing_dies_at_once(
    top: Path,  # noqa: F811
    call: str,
    sig: signal.Signals,
) -> None:
    backing, mnt = top / "backing", top / "mnt"
    code, started = _KILLABLE_CALLS[call]
    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        caller = _attacker_proc(_call_code(mnt, code, _DEFAULT_SIGINT))
        try:
            # the sentinel: BACKING's side of the call has begun, and waits
            assert fs.line() == started
            caller.send_signal(sig)
            status = _reaped(caller)
            # BACKING has not been let go: it holds the call still
            served = _served_to_another_user(mnt)
        finally:
            fs.release()
            caller.kill()
            caller.wait()
        rc = shim.stop()
        log = shim.log()
    assert status == -sig, f"the killed caller waited for BACKING: {status}\n{log}"
    assert served == "f\n\n"
    assert rc == 0, log
    assert "Traceback" not in log
    assert "cannot tell who waits" not in log


def test_a_caller_not_signalled_gets_its_answer_however_long_it_waits(top: Path) -> None:  # noqa: F811
    # The watcher looks at every call that has waited: one whose caller is
    # only slow is answered when BACKING answers, never EINTR.  The
    # sentinel that it was looked at: a caller of a later call, killed, is
    # reaped (the watcher looks at all calls that waited, the older first).
    backing, mnt = top / "backing", top / "mnt"
    with (
        _held_listing_backing(backing) as fs,
        run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim,
    ):
        patient = _attacker_proc(_direct_read(mnt / "slow"))
        killed = None
        try:
            assert fs.line() == "reading slow\n"
            killed = _attacker_proc(_direct_read(mnt / "s001"))
            assert fs.line() == "reading s001\n"
            killed.kill()
            status = _reaped(killed)
            waiting = patient.poll() is None
            fs.release()
            out, err = patient.communicate(timeout=START_TIMEOUT)
        finally:
            fs.release()
            for proc in (patient, killed):
                if proc is not None:
                    proc.kill()
                    proc.wait()
        rc = shim.stop()
    assert status == -signal.SIGKILL
    assert waiting
    assert (out, err) == ("b'f\\n'\n", "")
    assert patient.returncode == 0
    assert rc == 0


def test_a_caller_killed_while_its_open_waits_for_a_lease_dies_at_once(top: Path) -> None:  # noqa: F811
    # An open that conflicts with a user's lease on BACKING waits for its
    # holder, up to lease-break-time (45 s), in a thread: its caller, killed
    # meanwhile, waited as long.
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    os.chmod(backing, 0o777)
    with run_shim(backing, mnt, top / "absent.sock", "--allow-other") as shim:
        holder = _lease_holder(backing / "leased")
        opener = None
        try:
            assert _holder_says(holder) == "leased\n", holder.stderr
            opener = _attacker_proc(f"open({str(mnt / 'leased')!r})")
            # the sentinel: the overlay's open waits for the holder
            assert _holder_says(holder, opener) == "asked to let go\n", holder.communicate()
            opener.kill()
            status = _reaped(opener)
            lease_held = _lease_breaking(backing / "leased")
            holder.communicate("", timeout=START_TIMEOUT)
        finally:
            for p in (holder, opener):
                if p is not None:
                    p.kill()
                    p.wait()
        rc = shim.stop()
        log = shim.log()
    assert status == -signal.SIGKILL, f"the killed caller waited for the lease: {status}"
    assert lease_held, "the lease was broken before the killed caller was reaped"
    assert rc == 0, log
    assert "Traceback" not in log
