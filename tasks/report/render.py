"""Rendering: the Jinja templates beside this module, their filters, and Markdown to HTML with markdown-it.

The templates write Markdown; HTML comes from that Markdown only. Every value read from an artifact goes into a
template through a filter: `md` (literal text), `code` (a code span), or a number format (`f4`, `pct`, `n`), so text
from the data never becomes markup. markdown-it runs with raw HTML disabled: whatever HTML the Markdown holds is
escaped there, and the page's Content-Security-Policy forbids scripts and every fetch besides embedded images.
"""

from __future__ import annotations

import base64
import operator
import re
from functools import cache
from typing import Any

import jinja2
from markdown_it import MarkdownIt

from tasks.dataset import version_label
from tasks.report.context import GALLERY_MAX
from tasks.report.figures import FIGURES

# Up to this many classes the report has the confusion matrix as a table too (beyond, it is too wide to read).
CONFUSION_TABLE_MAX = 30
# Up to this many classes the introduction names them all.
CLASS_LIST_MAX = 20

# The characters with a meaning inside a line of CommonMark (and GFM tables and strikethrough), and `#`; values are
# placed inside lines, never at a line start where `-`, `+`, `>` or `1.` would begin a block.
_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]<>&!|~#])")
_PLAIN_CODE = re.compile(r"[^`|\s](?:[^`|\r\n]*[^`|\s])?")


def md(value: Any) -> str:
    """Return a value as literal Markdown text inside a line: inline markup characters backslash-escaped (CommonMark
    allows a backslash before any ASCII punctuation), lines folded."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _INLINE_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines()))


def code(value: Any) -> str:
    """Return a value as a Markdown code span, or as literal text if it holds what a code span cannot (`, |, lines)."""
    text = str(value)
    return f"`{text}`" if _PLAIN_CODE.fullmatch(text) else md(text)


def data_uri(png: bytes) -> str:
    """Return PNG bytes as a base64 data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("tasks.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html.j2"], default_for_string=False, default=False),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(
        md=md,
        code=code,
        f4=lambda v: f"{float(v):.4f}",
        pct=lambda v: f"{100 * float(v):.2f}%",
        n=lambda v: str(operator.index(v)),  # an integer, or an error
        grouped=lambda v: f"{operator.index(v):,}",  # an integer with thousands separators, or an error
        times=lambda v, word: f"{operator.index(v)} {word}{'' if v == 1 else 's'}",  # `1 epoch`, `2 epochs`
        version=version_label,
    )
    env.globals.update(FIGURES=FIGURES, GALLERY_MAX=GALLERY_MAX, CONFUSION_TABLE_MAX=CONFUSION_TABLE_MAX,
                       CLASS_LIST_MAX=CLASS_LIST_MAX, zip=zip)
    return env


def render(template: str, **values: Any) -> str:
    """Render one template of `templates/` with the given values."""
    return _environment().get_template(template).render(**values)


def markdown_page(markdown: str, title: str) -> str:
    """Return Markdown as a self-contained HTML page (raw HTML in the Markdown is escaped, not passed through).

    `title` is plain text (the page template escapes it).
    """
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return render("report.html.j2", title=title, body=body)
