"""A small Markdown-to-HTML renderer for lessons, so `idtlab lab show` needs no package.

The subset (what docs/labs.md tells teachers): ATX headings (`#`..`######`, each gets an
id from its text, so a check's hint can link to it), paragraphs, fenced code blocks
(```` ``` ````, drawn as-is: the place for ASCII stack pictures), bullet (`-`, `*`) and
numbered (`1.`) lists, block quotes (`>`), pipe tables, horizontal rules (`---`), and
inline `code`, **bold**, *italic*, [links](url) and images `![alt](file.svg)` (a file
of the lab folder is inlined, so the page stays one file). Everything else is text,
HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from pathlib import Path

_INLINE = re.compile(r"(`+)(.+?)\1|!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)"
                     r"|\*\*(.+?)\*\*|(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "section"


def _image(alt: str, src: str, base: Path | None) -> str:
    if base is not None and not re.match(r"[a-z]+:", src):
        path = base / src
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".svg":
                return f"<span class='figure' role='img' aria-label='{html.escape(alt)}'>" \
                       f"{data.decode()}</span>"
            mime = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif"}.get(
                path.suffix, "application/octet-stream")
            return (f"<img alt='{html.escape(alt)}' src='data:{mime};base64,"
                    f"{base64.b64encode(data).decode()}'>")
    return f"<img alt='{html.escape(alt)}' src='{html.escape(src)}'>"


def inline(text: str, base: Path | None = None) -> str:
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1):
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        elif m.group(4) is not None:
            out.append(_image(m.group(3), m.group(4), base))
        elif m.group(6) is not None:
            out.append(f"<a href='{html.escape(m.group(6))}'>{inline(m.group(5), base)}</a>")
        elif m.group(7) is not None:
            out.append(f"<strong>{inline(m.group(7), base)}</strong>")
        else:
            out.append(f"<em>{inline(m.group(8), base)}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _table(rows: list[str], base: Path | None) -> str:
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = cells(rows[0])
    body = [cells(r) for r in rows[2:]]
    h = "".join(f"<th>{inline(c, base)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{inline(c, base)}</td>" for c in r) + "</tr>"
                for r in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def to_html(text: str, base: Path | None = None,
            heading_id: Callable[[str], str] = slug) -> str:
    """Render `text`; `base` is the folder relative image paths are read from."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para), base)}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            lang = stripped[3:].strip()
            block: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            cls = f" class='language-{html.escape(lang)}'" if lang else ""
            out.append(f"<pre><code{cls}>{html.escape(chr(10).join(block))}</code></pre>")
            i += 1
            continue
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            flush()
            level = len(m.group(1))
            out.append(f"<h{level} id='{heading_id(m.group(2))}'>{inline(m.group(2), base)}"
                       f"</h{level}>")
            i += 1
            continue
        if not stripped:
            flush()
            i += 1
            continue
        if re.fullmatch(r"(-{3,}|\*{3,})", stripped):
            flush()
            out.append("<hr>")
            i += 1
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and re.fullmatch(
                r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[i + 1].strip()):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i])
                i += 1
            out.append(_table(rows, base))
            continue
        if stripped.startswith(">"):
            flush()
            quote = []
            while i < len(lines) and lines[i].strip().startswith(">"):
                quote.append(lines[i].strip()[1:].lstrip())
                i += 1
            out.append(f"<blockquote>{to_html(chr(10).join(quote), base, heading_id)}"
                       "</blockquote>")
            continue
        lm = re.match(r"\s*([-*]|\d+\.)\s+(.*)", line)
        if lm:
            flush()
            ordered = lm.group(1)[0].isdigit()
            items: list[str] = []
            while i < len(lines):
                im = re.match(r"\s*([-*]|\d+\.)\s+(.*)", lines[i])
                if im and im.group(1)[0].isdigit() == ordered:
                    items.append(im.group(2))
                elif lines[i].startswith((" ", "\t")) and lines[i].strip() and items:
                    items[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{inline(t, base)}</li>" for t in items)
                       + f"</{tag}>")
            continue
        para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)
