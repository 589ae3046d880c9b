"""What an answer means, beyond its shape: placeholder text copied back from the answer format, and names a change
removes although the rest of the script still uses them (the run would die with NameError). Both return what is
wrong (or nothing); tui.prompt turns that into the message for the model.
"""

import ast
import builtins
import re

TEMPLATE_RE = re.compile(r"<([^<>\n]{8,})>")  # a "<...>" template of a format text
TEMPLATE_WORDS = 3  # a copy is recognised by the template's first words after "<" (the model may shorten the rest)
BUILTINS = frozenset(dir(builtins))


def templates(*formats: str) -> list:
    """The "<...>" templates of the format texts, as (recognising prefix, whole template)."""
    out = []
    for fmt in formats:
        for inner in TEMPLATE_RE.findall(fmt):
            prefix = "<" + " ".join(inner.split()[:TEMPLATE_WORDS])
            out.append((prefix.lower(), f"<{inner}>"))
    return list(dict.fromkeys(out))


def placeholder_in(text: str, known: list, phrases: tuple = ()) -> str | None:
    """The template of `known` (from templates()) or the phrase of `phrases` (field descriptions of the structured
    format) that `text` copies, or None."""
    low = " ".join((text or "").lower().split())
    for prefix, whole in known:
        if prefix in low:
            return whole
    return next((p for p in phrases if p.lower() in low), None)


def _bound(tree: ast.AST) -> dict:
    """name -> line of its first binding anywhere in the module: assignments, imports, defs, arguments, handlers.
    "*" is in it when a star import could bind anything."""
    out = {}

    def add(name, node):
        out.setdefault(name, getattr(node, "lineno", 0))

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            add(node.id, node)
        elif isinstance(node, ast.alias):
            add(node.asname or node.name.split(".")[0], node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(node.name, node)
        elif isinstance(node, ast.arg):
            add(node.arg, node)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            add(node.name, node)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            add(node.name, node)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            add(node.rest, node)
    return out


def dropped_names(old: ast.AST, new: ast.AST) -> list:
    """Names the old script binds and the new one no longer binds anywhere, while it still reads them: in the order
    the old script defines them. A name still bound somewhere (in a branch, in a function) counts as defined: this
    never refuses a working script, and catches what a dropped block line or a deleted definition does."""
    before, after = _bound(old), _bound(new)
    if "*" in after:
        return []  # a star import may bind them: cannot tell
    loaded = {n.id for n in ast.walk(new) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    gone = [name for name in before if name not in after and name in loaded and name not in BUILTINS]
    return sorted(gone, key=lambda name: before[name])
