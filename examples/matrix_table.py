"""The README's "What combines with what" table, built from the matrix test's own cell list.

The cells are those of ``tests/matrix/test_matrix.py`` (defined in ``tests/matrix/matrix_cells.py``): an entry names
the interfaces whose test cell exists (``Python``: ``Trainer(...).fit(module, datamodule)``; ``YAML``:
``lightning-plugins fit --config``); a cell kept as a strict xfail for a known bug is shown with its reason.

    python examples/matrix_table.py            # print the table
    python examples/matrix_table.py --write    # and put it into README.md between its matrix markers
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- matrix:start -->\n", "<!-- matrix:end -->"
LABELS = {"python": "Python", "yaml": "YAML"}
COLUMNS = [("32-true", "single", "`32-true`"), ("fp8-O1", "single", "FP8 O1"), ("fp8-O2", "single", "FP8 O2"),
           ("fp8-O1", "ddp", "DDP, FP8 O1"), ("fp8-O2", "ddp", "DDP, FP8 O2"),
           ("fp8-O1", "fsdp2", "FSDP2, FP8 O1"), ("fp8-O2", "fsdp2", "FSDP2, FP8 O2"),
           ("fp8-O3", "fsdp2", "FSDP2, FP8 O3")]


def _cells():
    sys.path.insert(0, str(REPO / "tests" / "matrix"))
    try:
        import matrix_cells
    finally:
        sys.path.pop(0)
    return matrix_cells


def table() -> str:
    """The markdown table (with its footnotes) for the current cell list."""
    cells = _cells()
    notes: list[str] = []
    lines = ["| module | " + " | ".join(title for _, _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for module in cells.MODULES:
        for gslora in (False, True):
            row = [c for c in cells.CELLS if c.module == module and c.gslora == gslora]
            if not row:
                continue
            entries = []
            for precision, strategy, _ in COLUMNS:
                found = [c for c in row if c.precision == precision and c.strategy == strategy]
                parts = []
                for cell in found:
                    label = LABELS[cell.interface]
                    if cell.xfail:
                        notes.append(f"{cell.id}: {cell.xfail}")
                        label = f"{label} (fails, [{len(notes)}])"
                    parts.append(label)
                entries.append(", ".join(parts) if parts else "not tested")
            name = f"`{module}`" + (" + `GSLoRA`" if gslora else "")
            lines.append(f"| {name} | " + " | ".join(entries) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"[{i}] {note}  " for i, note in enumerate(notes, 1)) + "\n"
    return text


def write_readme(path: Path = REPO / "README.md") -> None:
    readme = path.read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + table() + END + tail)


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_readme()
    print(table(), end="")
