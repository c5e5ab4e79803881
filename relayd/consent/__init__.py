"""Consent: who may reach whom through which list (RFC 5360-5362, RFC 4745, RFC 4826).

The rules, the permission store and the vocabulary both the SIP relay and the XCAP
server speak. Both import this package; it imports neither of them, and reads the SIP
URIs lists and rules are made of with the URI codec alone (``sipuri.py``).
"""
