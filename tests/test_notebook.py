"""The notebooks run top to bottom, headless, without an error (they import the real code).

The test executes it in memory with its figures and table sent to a temporary folder: the
committed notebook and docs/ stay untouched. To regenerate them (outputs, docs/nb_*.png,
docs/nb_table.md) on purpose:

    python tests/test_notebook.py --regenerate

The digits notebook writes no files (its pretrained flow goes to the ignored .cache/); regenerate
it with `python tests/test_notebook.py --regenerate --digits`.
"""

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "g2rpo_toy.ipynb"
DIGITS = NOTEBOOK.with_name("g2rpo_digits.ipynb")


def execute(docs_dir=None, notebook=NOTEBOOK):
    """Run a notebook in notebooks/ (its imports are relative to it); return the executed copy.
    docs_dir: where the toy notebook's figures and table go (default: the repository's docs/)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    old = os.environ.get("G2RPO_DOCS_DIR")
    if docs_dir is not None:
        os.environ["G2RPO_DOCS_DIR"] = str(docs_dir)  # the kernel inherits this environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("G2RPO_DOCS_DIR", None)
        else:
            os.environ["G2RPO_DOCS_DIR"] = old
    return nb


@pytest.mark.parametrize("notebook, imports", [(NOTEBOOK, "import g2rpo, toy_flow"),
                                               (DIGITS, "from worlds import digits_flow, studies")])
def test_notebook_holds_no_copy_of_the_algorithm(notebook, imports):
    cells = json.loads(notebook.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for name in ("def sde_step", "def group_advantages", "def clipped_grpo_loss", "class ToyFlow",
                 "class DigitsFlow", "class Proxy"):
        assert name not in source
    assert imports in source
    assert all(c.get("outputs") for c in cells if c["cell_type"] == "code"), "commit it with outputs"


@pytest.mark.skipif(os.environ.get("G2RPO_SKIP_NOTEBOOK") == "1", reason="G2RPO_SKIP_NOTEBOOK=1")
def test_notebook_executes_headless(tmp_path):
    before = NOTEBOOK.read_bytes()
    nb = execute(docs_dir=tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "notebook ran in" in text and "| G²RPO | 100 |" in text
    assert (tmp_path / "nb_table.md").is_file() and list(tmp_path.glob("nb_*.png"))
    assert NOTEBOOK.read_bytes() == before


@pytest.mark.skipif(os.environ.get("G2RPO_SKIP_NOTEBOOK") == "1", reason="G2RPO_SKIP_NOTEBOOK=1")
def test_digits_notebook_executes_headless():
    before = DIGITS.read_bytes()
    nb = execute(notebook=DIGITS)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "notebook ran in" in text and "g2rpo_wo_mgai" in text and "β = 10" in text
    assert sum(o.get("output_type") == "display_data" for o in outputs) >= 7  # the pictures
    assert DIGITS.read_bytes() == before


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="tests/test_notebook.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", required=True,
                        help="re-execute the notebook in place and rewrite docs/nb_*")
    parser.add_argument("--digits", action="store_true",
                        help="the digits notebook instead (it writes no figures to docs/)")
    args = parser.parse_args()
    import nbformat

    notebook = DIGITS if args.digits else NOTEBOOK
    nbformat.write(execute(notebook=notebook), notebook)
    print(f"executed {notebook} in place" + ("" if args.digits else
                                              "; figures and table written to docs/"))
