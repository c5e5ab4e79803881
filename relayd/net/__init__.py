"""Networking shared by every surface: listener strings, TLS contexts, the TLS transport."""
