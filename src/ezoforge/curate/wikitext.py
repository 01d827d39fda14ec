"""MediaWiki wikitext to plain text, with mwparserfromhell's parse tree.

Links become their label; templates, <ref>s, tables, files, categories and interlanguage links vanish
(a few inline templates that render words, such as {{lang}} and {{仮リンク}}, keep those words);
bold/italic markup goes; the trailing 脚注・出典・参考文献・関連項目・外部リンク sections are cut. Paragraph
text stays intact, one paragraph (or heading, or list item) per line.
"""
from __future__ import annotations

import re

import mwparserfromhell as mw
from mwparserfromhell.nodes import (Comment, ExternalLink, Heading, HTMLEntity, Tag, Template, Text,
                                    Wikilink)
from mwparserfromhell.wikicode import Wikicode

CUT_SECTIONS = frozenset({"脚注", "注釈", "出典", "参考文献", "関連項目", "外部リンク"})
# Built-in names for the File, Media and Category namespaces; a dump's siteinfo adds its local names.
DROP_NAMESPACES = frozenset({"file", "image", "media", "category", "ファイル", "画像", "メディア", "カテゴリ"})
DROP_TAGS = frozenset({"ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline",
                       "imagemap", "templatedata", "syntaxhighlight", "source", "pre", "graph", "mapframe",
                       "maplink", "inputbox", "categorytree"})
LIST_MARKUP = frozenset({"*", "#", ";", ":", "----"})
# Inline templates that render part of their arguments as running text: name -> positional argument shown.
INLINE_TEMPLATES = {"lang": "2", "仮リンク": "1", "ruby": "1", "ruby-ja": "1", "nowrap": "1", "要出典範囲": "1"}

_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z]+)*")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_BRACKETS = re.compile(r"[（(][\s、，,]*[）)]")


def wikitext_to_text(wikitext: str, drop_namespaces: frozenset[str] = DROP_NAMESPACES) -> str:
    body = _render(_without_cut_sections(mw.parse(wikitext)), drop_namespaces)
    body = _EMPTY_BRACKETS.sub("", _MAGIC_WORD.sub("", body))
    body = re.sub(r"（[\s、，,]+", "（", re.sub(r"[\s、，,]+）", "）", body))
    lines = (re.sub(r"[ \t]{2,}", " ", line).strip() for line in body.split("\n"))
    return "\n".join(line for line in lines if line)


def _section_title(heading: Heading) -> str:
    return heading.title.strip_code().strip()


def _without_cut_sections(code: Wikicode) -> list:
    """Top-level nodes minus each cut section (its heading up to the next heading of the same or higher level)."""
    kept, cut_level = [], None
    for node in code.nodes:
        if isinstance(node, Heading):
            if cut_level is not None and node.level <= cut_level:
                cut_level = None
            parts = re.split(r"[・、/]", _section_title(node))
            if cut_level is None and all(p.strip() in CUT_SECTIONS for p in parts):
                cut_level = node.level
        if cut_level is None:
            kept.append(node)
    return kept


def _render(nodes, drop_ns: frozenset[str]) -> str:
    return "".join(_node_text(n, drop_ns) for n in nodes)


def _node_text(node, drop_ns: frozenset[str]) -> str:
    if isinstance(node, Text):
        return node.value
    if isinstance(node, Wikilink):
        return _link_text(node, drop_ns)
    if isinstance(node, ExternalLink):
        return _render(node.title.nodes, drop_ns) if node.title is not None else ""
    if isinstance(node, Template):
        return _template_text(node, drop_ns)
    if isinstance(node, Tag):
        return _tag_text(node, drop_ns)
    if isinstance(node, Heading):
        return "\n" + _render(node.title.nodes, drop_ns).strip() + "\n"
    if isinstance(node, HTMLEntity):
        return node.normalize()
    if isinstance(node, Comment):
        return ""
    return ""  # arguments ({{{1}}}) and anything else that renders nothing in an article


def _link_text(link: Wikilink, drop_ns: frozenset[str]) -> str:
    title = str(link.title).strip()
    if not title.startswith(":") and ":" in title:
        prefix = title.split(":", 1)[0].strip().lower()
        if prefix in drop_ns or _INTERLANGUAGE.fullmatch(prefix):
            return ""
    shown = link.text if link.text is not None else link.title
    return _render(shown.nodes, drop_ns).lstrip(":")


def _template_text(template: Template, drop_ns: frozenset[str]) -> str:
    name = str(template.name).strip().replace("_", " ").lower()
    arg = INLINE_TEMPLATES.get(name) or ("1" if name.startswith("lang-") else None)
    if arg is None or not template.has(arg):
        return ""
    return _render(template.get(arg).value.nodes, drop_ns)


def _tag_text(tag: Tag, drop_ns: frozenset[str]) -> str:
    name = str(tag.tag).strip().lower()
    if name in DROP_TAGS or tag.wiki_markup in LIST_MARKUP:
        return ""
    if name == "br":
        return "\n"
    if name == "nowiki":
        return str(tag.contents) if tag.contents is not None else ""
    return _render(tag.contents.nodes, drop_ns) if tag.contents is not None else ""
