"""The rooms of docs/architecture.md: every import of seesaw code goes down the table written there,
never back up and never round in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
ROW = re.compile(r"^\| `(\w+)` \| [^|]* \|(.*)\|$")


def _table() -> dict[str, set[str]]:
    """The rooms table: each room and the rooms it may import."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Rooms and the way imports run"):]
    section = section[:section.index("\n## ", 1)]
    allowed = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            allowed[match.group(1)] = {name.strip() for name in match.group(2).split(",") if name.strip()}
    return allowed


def _room(module: str) -> str:
    if module.startswith("seesaw.transport.specs"):
        return "specs"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "seesaw"


def _imports() -> dict[tuple[str, str], list[str]]:
    """(room, room it imports) -> the files that do, for every import of seesaw code at any depth."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "seesaw").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = _room(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("seesaw."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("seesaw.")]
            else:
                continue
            for target in targets:
                if _room(target) != source:
                    found.setdefault((source, _room(target)), []).append(str(path.relative_to(ROOT)))
    return found


def test_the_table_names_every_room_and_runs_one_way():
    allowed = _table()
    rooms_in_code = {_room(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
                     for p in (ROOT / "seesaw").rglob("*.py")} - {"seesaw"}
    assert rooms_in_code == set(allowed), "a room is missing from the table, or the table names one that is gone"
    order = list(allowed)  # a room may import only rooms listed above it: no circles
    for room, imports in allowed.items():
        assert imports <= set(order[:order.index(room)]), f"{room} may import a room below it: {imports}"


def test_every_import_goes_down_the_table():
    allowed = _table()
    forbidden = {pair: files for pair, files in _imports().items()
                 if pair[0] != "seesaw" and pair[1] not in allowed.get(pair[0], set())}
    assert not forbidden, "imports the rooms table does not allow: " + "; ".join(
        f"{source} -> {target} ({', '.join(sorted(set(files)))})" for (source, target), files in forbidden.items())
