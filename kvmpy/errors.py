"""Errors kvmpy reports to its user as one clear line (never a traceback)."""


class KvmpyError(Exception):
    """A user-facing error: bad input, missing /dev/kvm, a malformed image.

    The CLI prints `kvmpy: <message>` and exits with status 2.
    """


class KvmUnavailable(KvmpyError):
    """/dev/kvm is missing, not permitted, or lacks a capability kvmpy needs."""


class ImageError(KvmpyError):
    """A guest image that is missing, malformed, or does not fit in guest RAM."""
