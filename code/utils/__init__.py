"""Shared utilities: errors and atomic file I/O (io), task settings (task), schedules (ramps), losses, metrics."""
