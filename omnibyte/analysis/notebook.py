"""Execute the transfer notebook and save it with its outputs, reproducibly.

``python -m omnibyte.analysis.notebook`` re-runs ``notebooks/cross_modal_transfer.ipynb`` on the shipped
study (``results/transfer``) and writes it back with its figures and tables, as it is committed. The test
suite calls :func:`execute` on runs it makes itself. Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the
``dev`` or ``notebook`` extra).

What varies between executions is left out of the saved file: no per-cell timing metadata, the kernel's
``language_info`` reduced to its name, and no machine paths (:func:`machine_paths` finds any left).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "cross_modal_transfer.ipynb"
# absolute paths of this machine that must not end up in a committed notebook
_MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users|private|var/folders)/")


def execute(path: str | os.PathLike = NOTEBOOK, *, env: Mapping[str, str] | None = None, timeout: int = 300,
            save: str | os.PathLike | None = None) -> Any:
    """Run the notebook at ``path`` top to bottom in a fresh ``python3`` kernel started in its folder, with
    ``env`` added to the environment (e.g. ``OMNIBYTE_RUNS``); returns the executed ``NotebookNode``
    and, with ``save``, writes it there. Figures render inline as PNG; ``omnibyte`` imports from this
    checkout."""
    import nbclient
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in ("MPLBACKEND", "PYTHONPATH", *(env or {}))}
    os.environ.update({"MPLBACKEND": "module://matplotlib_inline.backend_inline",
                       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), old["PYTHONPATH"]) if p),
                       **(env or {})})
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    if save is not None:
        nbformat.write(nb, str(save))
    return nb


def outputs(nb: Any, kind: str = "text") -> list[Any]:
    """Every code cell output of one kind: ``text`` (stream text and ``text/plain``), ``image/png`` or
    ``error`` (the error outputs themselves)."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            if kind == "error":
                if o.get("output_type") == "error":
                    out.append(o)
            elif kind == "text":
                text = o.get("text", "") or o.get("data", {}).get("text/plain", "")
                if text:
                    out.append(text if isinstance(text, str) else "".join(text))
            elif kind in o.get("data", {}):
                out.append(o["data"][kind])
    return out


def machine_paths(text: str) -> list[str]:
    """Absolute paths of a machine (``/work/...``, ``/tmp/...``, ``/root/...``, ``/home/...``) in ``text``."""
    return [text[m.start():m.start() + 60].split()[0] for m in _MACHINE_PATH.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Execute the transfer notebook on the shipped study and save it "
                                             "with its outputs (OMNIBYTE_RUNS unset: results/transfer).")
    ap.add_argument("notebook", nargs="?", default=str(NOTEBOOK), help="notebook to execute (default: %(default)s)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell (default: %(default)s)")
    args = ap.parse_args(argv)
    env = {"OMNIBYTE_FIGURES": ""}
    saved_runs = os.environ.pop("OMNIBYTE_RUNS", None)  # the committed outputs come from results/transfer
    try:
        nb = execute(args.notebook, env=env, timeout=args.timeout, save=args.notebook)
    finally:
        if saved_runs is not None:
            os.environ["OMNIBYTE_RUNS"] = saved_runs
    errors = outputs(nb, "error")
    leaks = machine_paths(Path(args.notebook).read_text())
    size = Path(args.notebook).stat().st_size
    print(f"{os.path.relpath(args.notebook)}: {len(outputs(nb, 'image/png'))} figures, {len(errors)} errors, "
          f"{size / 1e6:.2f} MB, machine paths: {leaks or 'none'}")
    return 1 if errors or leaks else 0


if __name__ == "__main__":
    raise SystemExit(main())
