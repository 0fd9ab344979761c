"""gifting: a real-time live-stream gifting server."""

__version__ = "0.1.0"
