"""The documentation against the code: README.md and docs/*.md cannot rot silently.

- Their Python snippets run, against tiny models (the front page's g2rpo.train call and the
  guard rails as written; the export snippet on the weights of a tiny FLUX run).
- Every `--flag` they write beside a command of this repository (`python script.py` or
  `python -m module`, torchrun's too), and every one in the commands the modules' docstrings
  show, is a flag that command's argparse parser accepts (the parsers are built by running each
  command's own parsing code, stopped before it parses anything: no model loads, no network); a
  bare `--flag` belongs to the last command named in its paragraph, or else to one of the
  repository's commands.
- Every figure they show exists, and every link between pages resolves, anchors included.
"""

import argparse
import ast
import os
import re
import runpy
import textwrap
import warnings
from pathlib import Path
from unittest import mock

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```$", re.S | re.M)
# Flags of other programs that the pages mention (torchrun's, TensorBoard's, the Hub CLI's).
EXTERNAL_FLAGS = {"--nproc_per_node", "--logdir", "--local-dir"}


def page_id(page):
    return str(page.relative_to(ROOT))


def fenced(page, language):
    """The page's fenced blocks in `language`, dedented (a block may sit inside a list item)."""
    return [textwrap.dedent(body) for lang, body in FENCE.findall(page.read_text())
            if lang == language]


# ----------------------------------------------------------------------------------------------
# The snippets run.


class TinyFlow(torch.nn.Module):
    """v = W x + b_c + σ·u on 3 dimensions: a conditional flow small enough for 300 iterations."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.3 * torch.randn(3, 3, generator=g))
        self.b = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.u = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x, sigma, c):
        return x @ self.w.T + self.b[c] + sigma[:, None] * self.u


def snippet_namespace():
    model = TinyFlow()
    reference = TinyFlow().requires_grad_(False)
    evaluated = []

    def evaluate(m):
        evaluated.append([p.detach().clone() for p in m.parameters()])

    return {"model": model, "velocity_fn": model, "ref_velocity_fn": reference,
            "reward_fn": lambda x, prompts: -((x - torch.tensor(prompts)[:, None]) ** 2).sum(-1),
            "prompts": [0, 1, 2, 3], "latent_shape": (3,), "encode": torch.tensor,
            "evaluate": evaluate, "evaluated": evaluated}


def test_the_front_page_and_algorithm_page_snippets_run_as_written():
    (front,) = fenced(ROOT / "README.md", "python")
    (guard_rails,) = fenced(ROOT / "docs" / "algorithm.md", "python")
    ns = snippet_namespace()
    with mock.patch("tqdm.auto.tqdm", side_effect=ImportError):  # no bar in the test's output
        exec(front, ns)
        history = ns["history"]
        assert len(history) == ns["cfg"].num_iterations == 300
        assert all(torch.isfinite(torch.tensor(m["reward"])) for m in history)
        assert history[0]["ratio_dev_first"] < 1e-5
        before = [p.detach().clone() for p in ns["model"].parameters()]
        exec(guard_rails, ns)
    assert ns["cfg"].kl_beta == 3.0
    (inside,) = ns["evaluated"]  # evaluate(model) saw the averages, the model has its own after
    for p, a, b, avg in zip(ns["model"].parameters(), inside, before, ns["ema"].averages):
        assert torch.equal(a, avg) and not torch.equal(p, avg) and not torch.equal(p, b)


def test_the_gpu_page_snippet_loads_what_a_run_exports(tiny_flux, tiny_clip, tmp_path):
    from image_flow import trainer
    from test_image_flow import train_args

    for rank, out in (("4", tmp_path / "lora_run"), ("0", tmp_path / "full_run")):
        trainer.main(train_args(tiny_flux, tiny_clip, out, "--iterations", "1", "--lora-rank",
                                rank))
    (code,) = fenced(ROOT / "docs" / "gpu.md", "python")
    for path, here in (("/models/FLUX.1-dev", tiny_flux),
                       ("runs/flux/lora", str(tmp_path / "lora_run" / "lora")),
                       ("runs/flux/transformer", str(tmp_path / "full_run" / "transformer"))):
        assert f'"{path}"' in code
        code = code.replace(f'"{path}"', repr(here))
    ns = {}
    exec(code, ns)
    assert ns["pipe"].transformer is ns["transformer"]
    assert ns["transformer"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Every flag exists.


class _Built(Exception):
    """Carries the parser out of a command's own parsing code, before it parses."""


def _stop(self, *args, **kwargs):
    raise _Built(self)


_PARSERS = {}


def flags_of(command):
    """The option strings of `command`'s argparse parser: a script ('toy_flow.py',
    'tests/test_notebook.py') as `python script` runs it, or a module ('image_flow',
    'benchmarks.rollout') as `python -m module` does, stopped at its first parse_args."""
    if command not in _PARSERS:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", _stop), \
                mock.patch("sys.argv", [command]):
            with pytest.raises(_Built) as built:
                if command.endswith(".py"):
                    path = ROOT / command
                    assert path.is_file(), f"the docs run {command}, which is not in the repository"
                    runpy.run_path(str(path), run_name="__main__")
                else:  # a module the tests imported already: runpy says so, harmlessly
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        runpy.run_module(command, run_name="__main__", alter_sys=True)
        parser = built.value.args[0]
        _PARSERS[command] = {s: action.choices for action in parser._actions
                             for s in action.option_strings}
    return _PARSERS[command]


def repository_commands():
    """The commands with a command line: top-level scripts and modules in a folder with an
    argparse parser and a __main__ block ('toy_flow.py', 'worlds.digits_flow'), the packages
    that run as `python -m package` ('image_flow'), and scripts among the tests."""
    commands = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/*.py")):
        text, rel = path.read_text(), path.relative_to(ROOT)
        if path.name == "__main__.py":
            commands.append(rel.parent.name)
        elif "ArgumentParser(" in text and '__name__ == "__main__"' in text:
            in_tests = rel.parts[0] == "tests"
            commands.append(str(rel) if len(rel.parts) == 1 or in_tests
                            else ".".join(rel.with_suffix("").parts))
    return sorted(c for c in commands if c != "tests/test_docs.py")


def is_repository_module(module):
    """'image_flow.tiny' and 'benchmarks.rollout' are this repository's; 'pytest' is not."""
    first = module.split(".")[0]
    return (ROOT / first).is_dir() or (ROOT / f"{first}.py").is_file()


COMMAND = re.compile(r"(?:python|torchrun)\b[^`|;&\n]*?\s(?:-m\s+([\w.]+)|([\w/]+\.py))\b"
                     r"([^`|;&\n#]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def commands_in(text):
    """(command, the rest of its line) for every command of this repository in `text`."""
    return [(module or script, rest) for module, script, rest in COMMAND.findall(text)
            if script or is_repository_module(module)]


def flag_uses(page):
    """(command or None, flag) for every --flag on the page: those on a command line name its
    command; a bare one in inline code takes the last command its paragraph named."""
    text = page.read_text()
    uses = []
    for block in FENCE.findall(text):
        if block[0] in ("bash", "sh", ""):
            for line in block[1].replace("\\\n", " ").splitlines():
                line = line.split(" #")[0]
                uses += [(cmd, f) for cmd, rest in commands_in(line) for f in FLAG.findall(rest)]
    for paragraph in re.split(r"\n\s*\n", FENCE.sub("", text)):
        last = None
        for span in re.findall(r"`([^`]+)`", paragraph):
            commands = commands_in(span)
            for cmd, rest in commands:
                uses += [(cmd, f) for f in FLAG.findall(rest)]
                last = cmd
            if not commands:
                uses += [(last, f) for f in FLAG.findall(span)]
    return uses


def wrong_flags(uses):
    anywhere = set().union(*(flags_of(c) for c in repository_commands())) | EXTERNAL_FLAGS
    return sorted({(command or "any command", flag) for command, flag in uses
                   if flag not in (flags_of(command) if command else anywhere)
                   and flag not in EXTERNAL_FLAGS})


CHOICE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)[ =]([\w.-]+)")


def wrong_choices(text):
    """(command, flag, value) for every value a command line in `text` gives a flag with
    choices (--method, --study, --schedule …) that the flag does not take."""
    wrong = []
    for command, rest in commands_in(text):
        for flag, value in CHOICE.findall(rest):
            choices = flags_of(command).get(flag)
            if choices is not None and value not in choices and not value.startswith("-"):
                wrong.append((command, flag, value))
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_choice_the_docs_give_a_flag_is_one_it_takes(page):
    text = page.read_text().replace("\\\n", " ")
    wrong = [w for line in text.splitlines() for w in wrong_choices(line.split(" #")[0])]
    assert not wrong, f"{page_id(page)} gives flags values they refuse: {wrong}"


def test_every_choice_a_docstring_gives_a_flag_is_one_it_takes():
    sources = [p for p in sorted(ROOT.rglob("*.py")) if ".cache" not in p.parts]
    wrong = {}
    for path in sources:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found = [w for line in doc.splitlines() for w in wrong_choices(line.split(" #")[0])]
        if found:
            wrong[str(path.relative_to(ROOT))] = found
    assert not wrong, f"docstrings give flags values they refuse: {wrong}"
    # The check sees a refused value, e.g. a study that does not exist.
    assert wrong_choices("python -m worlds.digits_flow --study nonesuch --seeds 2") == [
        ("worlds.digits_flow", "--study", "nonesuch")]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_flag_the_docs_write_is_one_the_command_accepts(page):
    wrong = wrong_flags(flag_uses(page))
    assert not wrong, f"{page_id(page)} writes flags its commands do not accept: {wrong}"


def docstring_commands(path):
    """(command, flag) for the command lines a module's docstring shows (its --help text)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [(cmd, f) for line in doc.splitlines() for cmd, rest in commands_in(line.split(" #")[0])
            for f in FLAG.findall(rest)]


def test_every_flag_a_docstring_writes_is_one_the_command_accepts():
    sources = [p for p in sorted(ROOT.rglob("*.py")) if ".cache" not in p.parts]
    checked = {str(p.relative_to(ROOT)): docstring_commands(p) for p in sources}
    assert len([u for uses in checked.values() for u in uses]) > 20  # the check sees commands
    wrong = {name: w for name, uses in checked.items() if (w := wrong_flags(uses))}
    assert not wrong, f"docstrings write flags their commands do not accept: {wrong}"


def test_the_flag_check_finds_commands_and_bare_flags():
    uses = flag_uses(ROOT / "docs" / "toy.md")
    assert ("toy_flow.py", "--seeds") in uses  # on a command line
    assert ("toy_flow.py", "--no-step-per-branch") in uses  # bare, after the paragraph's command
    assert "--lora-rank" in flags_of("image_flow") and "--seeds" in flags_of("toy_flow.py")
    assert "--lora-rank" not in flags_of("toy_flow.py")
    assert "--regenerate" in flags_of("tests/test_notebook.py")
    assert commands_in("torchrun --nproc_per_node 8 -m image_flow --lora-rank 0") == [
        ("image_flow", " --lora-rank 0")]
    assert commands_in("python -m pytest -q -m gpu") == []  # not this repository's command
    assert {"image_flow", "image_flow.tiny", "worlds.digits_flow", "benchmarks.rollout",
            "toy_flow.py", "tests/test_notebook.py"} <= set(repository_commands())
    assert wrong_flags([("image_flow", "--no-such-flag")]) == [("image_flow", "--no-such-flag")]


# ----------------------------------------------------------------------------------------------
# Figures exist, links resolve.


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(page):
    if page.suffix != ".md":
        return set()
    seen, out = {}, set()
    for h in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(page):
    return re.findall(r"!?\[[^]]*\]\(([^)\s]+)\)", FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_figures_exist_and_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page_id(page)}: {broken}"


def test_the_link_check_knows_github_anchors():
    assert slug("Equation → function → test") == "equation--function--test"
    assert slug("Using `g2rpo.train`") == "using-g2rpotrain"
    assert slug("Differences from the paper / the official code") == (
        "differences-from-the-paper--the-official-code")
    assert "the-headline-result" in anchors(ROOT / "README.md")
    assert len(links(ROOT / "README.md")) > 10


def test_the_front_page_states_how_many_tests_the_suite_holds(request):
    from conftest import COLLECTED

    if {Path(a).resolve() for a in request.config.args} != {ROOT}:
        pytest.skip("the count is of the whole suite: python -m pytest -q")
    tests, gpu = request.config.stash[COLLECTED]
    said = re.search(r"python -m pytest -q +# ([\d,]+) tests, (\d+) of them GPU tests",
                     (ROOT / "README.md").read_text())
    assert said, "the quick start's test command says how many tests it runs"
    assert (int(said[1].replace(",", "")), int(said[2])) == (tests, gpu)


def test_the_front_page_stays_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "python toy_flow.py" in text and "python -m pytest -q" in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "nb_table.md":  # written by the notebook
            assert f"docs/{page.name}" in text, f"the front page does not link {page.name}"
            assert "**Reproducing the figures on this page.**" in page.read_text(), page.name


def layout_tree():
    """The paths docs/layout.md's tree names ('image_flow/families/seam.py', 'tests/')."""
    (tree,) = [body for lang, body in FENCE.findall((ROOT / "docs" / "layout.md").read_text())
               if not lang]
    paths, parents = [], []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        parents[depth:] = [name]
        paths.append("".join(parents[:depth + 1]))
    return paths


def test_the_layout_page_names_every_python_file_and_nothing_else():
    named = layout_tree()
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"docs/layout.md names what is not there: {missing}"
    files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
             if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    unnamed = sorted(files - set(named) - {"worlds/__init__.py", "image_flow/__init__.py"})
    assert not unnamed, f"docs/layout.md does not say where these live: {unnamed}"
    assert "image_flow/families/seam.py" in named and "benchmarks/rollout.py" in named


# ----------------------------------------------------------------------------------------------
# Every pointer resolves: to the paper's own numbers, to files and tests that are here.

TEXTS = sorted(p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".ipynb")
               and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))
# Files of other repositories the pages cite, each named beside its repository.
ELSEWHERE = {"fastvideo/train_grpo_flux.py": "MixGRPO", "config/grpo.py": "Flow-GRPO",
             "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py": "flow_grpo",
             "src/open_clip/transform.py": "hpsv2"}
# Algorithm 1's lines as the paper numbers them: 7–16 sampling (one x_T per group, the anchor, the
# SDE step, the completions), 20–22 the advantages, 24–26 the update.
ALGORITHM_1 = set(range(7, 17)) | set(range(20, 23)) | set(range(24, 27))


def numbered(pattern, text):
    found = set()
    for a, b in re.findall(pattern, text):
        found |= set(range(int(a), int(b or a) + 1))
    return found


def test_equation_and_algorithm_numbers_are_the_papers_own_and_unhedged():
    for path in TEXTS:
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        assert not re.search(r"\bSPEC\b|\u00a7|Eqs?\. ?~", text), rel  # pages readers lack
        assert numbered(r"Eqs?\. (\d+)(?:–(\d+))?", text) <= {1, 2, 3, 11}, rel
        lines = numbered(r"(?:Alg\.|Algorithm) 1,? lines? (\d+)(?:–(\d+))?", text)
        assert lines <= ALGORITHM_1, (rel, lines - ALGORITHM_1)


def test_every_file_the_repository_names_is_in_it_or_named_with_its_repository():
    here = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*")}
    names = {Path(p).name for p in here}
    wrong = []
    for path in TEXTS:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            for target in re.findall(r"(?<![\w/.-])([\w/-]+\.(?:py|md|ipynb))\b", line):
                if (target in here or target in names or any(h.endswith("/" + target) for h in here)
                        or "/" not in target and ("tmp_path" in line or target == "script.py")):
                    continue  # here; or a file a test makes, or a placeholder
                if ELSEWHERE.get(target, "\0") not in " ".join(lines[max(n - 2, 0):n]):
                    wrong.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not wrong, wrong


def test_every_test_the_docs_name_exists():
    defined = {name for path in [ROOT / "test_g2rpo.py", *sorted((ROOT / "tests").glob("*.py"))]
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    named = {name for page in PAGES for name in re.findall(r"`(test_\w+?)`", page.read_text())}
    assert named and not named - defined, sorted(named - defined)
