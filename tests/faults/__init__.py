"""Fault tests: real `gifting serve` processes on one external store, killed and restarted."""
