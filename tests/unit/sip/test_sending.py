"""The SIP cores send through :class:`~relayd.sip.sending.IRequestSender`: only the
stack's wiring (and the transport itself) imports the transport module."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import relayd.sip

SIP = Path(relayd.sip.__file__).parent


def _imported(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, and every ``package.name`` it imports from."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_only_the_stack_wires_the_transport_in() -> None:
    importers = {
        path.name
        for path in SIP.glob("*.py")
        if path.name != "transport.py" and "relayd.sip.transport" in set(_imported(path))
    }
    assert importers == {"stack.py"}
