"""The C++ API reference (docs/cpp-api.md) stays in sync with the public header: every function, type and
constant that conveyor.h declares at namespace scope appears in the page and has a comment in the header."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "conveyor" / "conveyor.h"
PAGE = ROOT / "docs" / "cpp-api.md"

DECLARATION = re.compile(r"^(?:class|struct|enum class)\s+(\w+)"
                         r"|^(?:constexpr\s+|const\s+)*[\w:<>]+[\s*&]+(\w+)\s*[(=]")


def public_declarations():
    """(name, line index) of every declaration at namespace scope (unindented) inside namespace conveyor."""
    lines = HEADER.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = DECLARATION.match(line)
        if m and not line.startswith(("namespace", "#", "//")):
            found.append((m.group(1) or m.group(2), i, lines))
    return found


def test_the_header_declares_what_we_expect():
    names = {name for name, _, _ in public_declarations()}
    assert {"forward", "backward", "TensorView", "CellOptions", "dropout_mask", "version"} <= names


def test_every_public_name_is_in_the_reference_page():
    page = PAGE.read_text()
    missing = sorted(name for name, _, _ in public_declarations() if f"`{name}`" not in page
                     and not re.search(rf"`{name}[`(,]|, `{name}`|`{name}, ", page))
    assert not missing, f"docs/cpp-api.md does not mention {missing}"


def test_every_public_declaration_has_a_comment():
    undocumented = []
    for name, i, lines in public_declarations():
        j = i - 1
        # A comment right above, or above a run of declarations it introduces (a group of one-liners).
        while j >= 0 and lines[j].strip() and not lines[j].lstrip().startswith("//"):
            j -= 1
        if j < 0 or not lines[j].lstrip().startswith("//") or i - j > 4:
            undocumented.append(name)
    assert not undocumented, f"conveyor.h: no comment above {undocumented}"
