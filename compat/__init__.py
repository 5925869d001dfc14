"""Compatibility bridges from scoutfs-notify records to existing watcher APIs.

:mod:`.inotify_shim` is the inotify bridge; :mod:`.demo` runs the whole
system (daemon, watch, shim, inotifywait) and :mod:`.procs` runs the shim as
a child process for it, the tests and the benchmarks.  ``compat`` builds on
:mod:`notifyd`; ``notifyd`` never imports ``compat``.
"""
