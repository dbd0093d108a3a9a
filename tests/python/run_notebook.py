"""Executes one Jupyter notebook headless with nbclient, the way
`jupyter nbconvert --execute` would, and writes the executed copy.

Usage: run_notebook.py NOTEBOOK OUTPUT_DIR [TIMEOUT_SECS]

Exits 1 on the first cell error, printing the failing cell's source and
traceback. On success prints one JSON line: the number of code cells, how
many produced an error output (always 0 here), and how many PNG images the
notebook rendered (its plots).
"""

import json
import os
import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main():
    notebook = pathlib.Path(sys.argv[1])
    out_dir = pathlib.Path(sys.argv[2])
    timeout = int(sys.argv[3]) if len(sys.argv) > 3 else 120
    os.environ.setdefault("MPLBACKEND", "Agg")
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        # Run where an analyst would: beside the notebook.
        resources={"metadata": {"path": str(notebook.parent)}},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / notebook.name
    try:
        client.execute()
    except CellExecutionError as e:
        nbformat.write(nb, out)
        # IPython colours tracebacks; a test log wants plain text.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        print(f"{notebook.name}: a cell failed:\n{plain}", file=sys.stderr)
        sys.exit(1)
    nbformat.write(nb, out)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    summary = {
        "notebook": notebook.name,
        "code_cells": len(code),
        "executed": sum(1 for c in code if c.get("execution_count")),
        "errors": sum(1 for o in outputs if o.get("output_type") == "error"),
        "images": sum(1 for o in outputs if "image/png" in o.get("data", {})),
        "output": str(out),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
