"""A pyfuse3 overlay that replays notify records as real inotify events."""
