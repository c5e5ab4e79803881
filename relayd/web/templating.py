"""The Jinja2 environment of the web pages: templates from the package, HTML
autoescaped, and an undefined name an error rather than an empty string."""

from __future__ import annotations

import jinja2


def environment() -> jinja2.Environment:
    """The templates under ``relayd/web/templates``."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("relayd.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
