"""Networking shared by every surface: listener strings and services, TLS contexts and transport."""
