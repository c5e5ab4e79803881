"""How relayctl shows XCAP documents and answers: aligned tables, JSON, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from relayd.consent.edits import ListView, RuleView
from relayd.consent.lists import Unroutable
from relayd.xcap.client import XCAPResponse


def http_error_line(method: str, path: str, response: XCAPResponse) -> str:
    """``<METHOD> <path>: <status> <reason>[: <condition> (<phrase>)]``."""
    line = f"{method} {path}: {response.status} {response.reason}".rstrip()
    found = response.xcap_error()
    if found is not None:
        condition, phrase = found
        line += f": {condition}"
        if phrase:
            line += f" ({' '.join(phrase.split())[:160]})"
    elif response.status == 401:
        line += ": wrong user name or password"
    elif response.status == 403:
        line += ": not your document (use the owner's account or an admin's)"
    return line


def render_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    body = [[str(cell) for cell in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in body:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(columns), *body]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _joined(values: Sequence[str], empty: str) -> str:
    return ",".join(values) if values else empty


def rules_table(rules: Sequence[tuple[str, RuleView]]) -> str:
    """One row per ``(document, rule)``: which document holds the rule comes first."""
    rows = [
        (
            document,
            rule.id,
            _joined(rule.senders, "-"),
            _joined(rule.lists, "any list"),
            _joined(rule.methods, "any"),
            _joined([u for _, u in rule.validity], "forever"),
            rule.action,
        )
        for document, rule in rules
    ]
    return render_table(("DOCUMENT", "RULE", "FROM", "LIST", "METHODS", "UNTIL", "ACTION"), rows)


def revoke_line(xui: str, changed: Sequence[tuple[str, int, bool]]) -> str:
    """What ``permissions revoke`` did: rules removed per ``(document, count, deleted)``."""
    count = sum(n for _, n, _ in changed)
    parts = [
        f"{document} ({n}{', document deleted' if deleted else ''})"
        for document, n, deleted in changed
    ]
    return f"revoked {count} rule{'s' if count != 1 else ''} of {xui}: {', '.join(parts)}\n"


def unroutable_json(items: Sequence[Unroutable], more: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"node": i.node, "list": i.list_name, "uri": i.uri, "reason": i.reason} for i in items
    ]
    if more:
        rows.append({"more": more})
    return rows


def unroutable_lines(items: Sequence[Unroutable], more: int = 0) -> str:
    """One ``not routed:`` line per item: the list (and entry) and the relay's reason."""
    lines = []
    for item in items:
        where = f"list {item.list_name}" if item.list_name else item.node
        if item.uri is not None:
            where += f", entry {item.uri}"
        lines.append(f"not routed: {where}: {item.reason}\n")
    if more:
        lines.append(f"not routed: {more} more\n")
    return "".join(lines)


def lists_table(lists: Sequence[ListView]) -> str:
    rows = [(view.name or "-", str(len(view.members)), view.display_name or "-") for view in lists]
    return render_table(("LIST", "MEMBERS", "DISPLAY NAME"), rows)


def members_table(view: ListView) -> str:
    rows = [(uri, name or "-") for uri, name in view.members]
    return render_table(("MEMBER", "DISPLAY NAME"), rows)
