"""Event tracing: see recorder.py (the rings), probes.py (the hooks), export.py."""
