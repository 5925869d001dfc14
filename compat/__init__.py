"""Compatibility bridges from scoutfs-notify records to existing watcher APIs."""
