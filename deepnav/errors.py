"""The one exception type that means "the user gave us something we cannot use".

Command lines print its message without a traceback; the Slicer modules show it in a dialog.
"""


class InputError(ValueError):
    """Bad input: a missing or unreadable file, wrong geometry, NaNs, a wrong model file."""


class PeerLost(RuntimeError):
    """Another process of a torchrun job failed, was stopped, or did not answer within the
    timeout (deepnav.distributed): this one stops too; that process's own error says why."""
