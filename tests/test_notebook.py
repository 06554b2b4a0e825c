"""The notebooks run top to bottom, headless, without an error (they import the real code).

The tests execute them with the toy's figures and table sent to a temporary folder: the
committed notebooks and docs/ stay untouched. They take minutes, so when they are among the
selected tests they start as soon as the tests are collected, in a process of their own beside
the other tests (on one torch thread, as every test process: conftest.py), and their tests wait
for it. To regenerate the committed outputs (and docs/nb_*.png, docs/nb_table.md) on purpose:

    python tests/test_notebook.py --regenerate

The digits notebook writes no files (its pretrained flow goes to the ignored .cache/); regenerate
it with `python tests/test_notebook.py --regenerate --digits`.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "g2rpo_toy.ipynb"
DIGITS = NOTEBOOK.with_name("g2rpo_digits.ipynb")
TESTS = {"test_notebook_executes_headless": NOTEBOOK,
         "test_digits_notebook_executes_headless": DIGITS}
SKIP = os.environ.get("G2RPO_SKIP_NOTEBOOK") == "1"
STARTED = {}  # notebook → (the process executing it, its folder, the committed bytes before)


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


def start_beside_the_other_tests(config, items):
    """Called once the tests are collected (conftest.py): start executing the selected tests'
    notebooks, one after the other, in a process of their own."""
    notebooks = [TESTS[item.originalname] for item in items if item.originalname in TESTS]
    if SKIP or not notebooks or config.option.collectonly:
        return
    folder = Path(tempfile.mkdtemp(prefix="g2rpo-notebooks-"))
    log = open(folder / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, __file__, "--execute-into", str(folder),
                             *map(str, notebooks)], stdout=log, stderr=subprocess.STDOUT)

    def stop():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)

    config.add_cleanup(stop)
    for notebook in notebooks:
        STARTED[notebook] = (proc, folder, notebook.read_bytes())


def executed(notebook, tmp_path):
    """(the executed notebook, the folder its figures went to, the committed bytes before)."""
    import nbformat

    if notebook not in STARTED:  # not started at collection (e.g. called by name): run it now
        before = notebook.read_bytes()
        return execute(docs_dir=tmp_path, notebook=notebook), tmp_path, before
    proc, folder, before = STARTED[notebook]
    done = folder / notebook.name
    while not done.exists() and proc.poll() is None:
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    if not done.exists():
        pytest.fail(f"executing {notebook.name} failed:\n"
                    + (folder / "log.txt").read_text()[-5000:])
    return nbformat.read(done, as_version=4), folder / "docs", before


@pytest.mark.parametrize("notebook, imports", [(NOTEBOOK, "import g2rpo, toy_flow"),
                                               (DIGITS, "from worlds import digits_flow, studies")])
def test_notebook_holds_no_copy_of_the_algorithm(notebook, imports):
    cells = json.loads(notebook.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for name in ("def sde_step", "def group_advantages", "def clipped_grpo_loss", "class ToyFlow",
                 "class DigitsFlow", "class Proxy", "def ode_step", "def group_rollout"):
        assert name not in source, name
    assert imports in source
    assert all(c.get("outputs") for c in cells if c["cell_type"] == "code"), "commit it with outputs"


def test_the_toy_notebook_samples_with_part_1_and_updates_with_it():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "g2rpo.group_rollout(" in source and "g2rpo.group_update(" in source
    assert "g2rpo.train(" in source and "g2rpo.clipped_grpo_loss(" in source


@pytest.mark.skipif(SKIP, reason="G2RPO_SKIP_NOTEBOOK=1")
def test_notebook_executes_headless(tmp_path):
    nb, docs, before = executed(NOTEBOOK, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "notebook ran in" in text and "| G²RPO | 100 |" in text
    assert (docs / "nb_table.md").is_file() and list(docs.glob("nb_*.png"))
    assert NOTEBOOK.read_bytes() == before


@pytest.mark.skipif(SKIP, reason="G2RPO_SKIP_NOTEBOOK=1")
def test_digits_notebook_executes_headless(tmp_path):
    nb, _, before = executed(DIGITS, tmp_path)
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
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regenerate", action="store_true",
                      help="re-execute the notebook in place and rewrite docs/nb_*")
    mode.add_argument("--execute-into", metavar="FOLDER",
                      help="execute the NOTEBOOKs into FOLDER (figures: FOLDER/docs), as the "
                           "tests do")
    parser.add_argument("--digits", action="store_true",
                        help="with --regenerate: the digits notebook instead (it writes no "
                             "figures to docs/)")
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", type=Path)
    args = parser.parse_args()
    import nbformat

    if args.execute_into:
        folder = Path(args.execute_into)
        for notebook in args.notebooks:
            nb = execute(docs_dir=folder / "docs", notebook=notebook)
            nbformat.write(nb, folder / f"{notebook.name}.tmp")
            os.replace(folder / f"{notebook.name}.tmp", folder / notebook.name)
            print(f"executed {notebook.name}", flush=True)
    else:
        notebook = DIGITS if args.digits else NOTEBOOK
        nbformat.write(execute(notebook=notebook), notebook)
        print(f"executed {notebook} in place" + ("" if args.digits else
                                                  "; figures and table written to docs/"))
