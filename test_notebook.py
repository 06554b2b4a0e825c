"""The toy notebook runs top to bottom, headless, without an error (it imports the real code).

The test executes it in memory with its figures and table sent to a temporary folder: the
committed notebook and docs/ stay untouched. To regenerate them (outputs, docs/nb_*.png,
docs/nb_table.md) on purpose:

    python test_notebook.py --regenerate
"""

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent / "notebooks" / "g2rpo_toy.ipynb"


def execute(docs_dir=None):
    """Run the notebook in notebooks/ (its imports are relative to it); return the executed copy.
    docs_dir: where its figures and table go (default: the repository's docs/)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    old = os.environ.get("G2RPO_DOCS_DIR")
    if docs_dir is not None:
        os.environ["G2RPO_DOCS_DIR"] = str(docs_dir)  # the kernel inherits this environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("G2RPO_DOCS_DIR", None)
        else:
            os.environ["G2RPO_DOCS_DIR"] = old
    return nb


def test_notebook_holds_no_copy_of_the_algorithm():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for name in ("def sde_step", "def group_advantages", "def clipped_grpo_loss", "class ToyFlow"):
        assert name not in source
    assert "import g2rpo, toy_flow" in source
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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="test_notebook.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", required=True,
                        help="re-execute the notebook in place and rewrite docs/nb_*")
    parser.parse_args()
    import nbformat

    nbformat.write(execute(), NOTEBOOK)
    print(f"executed {NOTEBOOK} in place; figures and table written to docs/")
