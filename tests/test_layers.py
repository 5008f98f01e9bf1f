"""The floors and which way imports go, read from the source (AST), so the rule cannot drift.

    library  k4flash/*.py            single-process model, math, sampler, weights, pipeline, outputs
    parallel parallel/*.py           distributed runtime and plans, wrapping the library from outside
    tools    k4flash/tools/*.py      off the inference path: the literal reference forward
    app      k4flash/app/*.py        Hydra schema, CLI, batches
    entry    run_inference_distil.py
    facade   k4flash/__init__.py     the model card's call; routes to parallel/ under a launcher, lazily
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# floor → the floors it may import (its own included)
ALLOWED = {
    "library": {"library"},
    "parallel": {"library", "parallel"},
    "tools": {"library", "tools"},
    "app": {"library", "parallel", "app", "facade"},
    "entry": {"app"},
    "facade": {"library", "parallel"},
}


def floor_of(module: str):
    """The floor a dotted module name belongs to; None for anything outside the project."""
    parts = module.split(".")
    if parts[0] == "parallel":
        return "parallel"
    if parts[0] == "run_inference_distil":
        return "entry"
    if parts[0] != "k4flash":
        return None
    if len(parts) == 1 or not (ROOT / "k4flash" / f"{parts[1]}.py").exists() and parts[1] not in ("app", "tools"):
        return "facade"  # `from k4flash import get_T2V_pipeline`: the package root, i.e. the facade
    return {"app": "app", "tools": "tools"}.get(parts[1], "library")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool):
    """(dotted name, line, at module level) of every import in `source`; `from X import y` counts as X.y
    when y is a module of the project (so `from . import comm` in parallel/ is parallel.comm)."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*candidate.split("."))).is_dir()
                found.append((candidate if is_module else base, node.lineno, id(node) in top_level))
    return found


def violations(path: Path, source: str = None) -> list:
    module = module_name(path)
    floor = floor_of(module)
    source = path.read_text() if source is None else source
    out = []
    for target, line, at_top in imported_modules(source, module, path.name == "__init__.py"):
        target_floor = floor_of(target)
        if target_floor is None or target_floor == floor:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if target_floor not in ALLOWED[floor]:
            out.append(f"{where}: {floor} module {module} imports {target} ({target_floor})")
        elif floor == "facade" and target_floor == "parallel" and at_top:
            out.append(f"{where}: the facade imports {target} at module level (it must stay lazy)")
    return out


def project_files():
    files = sorted((ROOT / "k4flash").rglob("*.py")) + sorted((ROOT / "parallel").rglob("*.py"))
    return files + [ROOT / "run_inference_distil.py"]


def test_every_floor_imports_only_downwards():
    found = [v for path in project_files() for v in violations(path)]
    assert found == [], "\n".join(found)


def test_every_project_file_has_a_floor():
    assert {floor_of(module_name(p)) for p in project_files()} == set(ALLOWED)


@pytest.mark.parametrize("path, line", [
    ("k4flash/pipeline.py", "from parallel.rank_pipeline import load_rank_pipeline"),
    ("k4flash/pipeline.py", "    import parallel.comm"),  # a lazy import counts too
    ("k4flash/dit.py", "from .app import cli"),
    ("k4flash/weights.py", "from k4flash import get_T2V_pipeline"),  # the facade routes to parallel/
    ("k4flash/sampler.py", "from .tools.reference import reference_forward"),
    ("parallel/plan.py", "from k4flash.tools import reference"),
    ("parallel/tp.py", "from k4flash.app.cli import run"),
    ("k4flash/__init__.py", "from parallel.rank_pipeline import load_rank_pipeline"),  # must stay lazy
])
def test_a_wrong_way_import_is_caught(path, line):
    """Negative control: the real file with one wrong-way import added fails the rule."""
    source = (ROOT / path).read_text()
    source += f"\n\ndef _added():\n{line}\n" if line.startswith("    ") else f"\n{line}\n"
    assert violations(ROOT / path) == [] and len(violations(ROOT / path, source)) == 1


def test_the_library_runs_without_parallel_and_the_facade_without_torch():
    """At run time too: importing every library module loads no parallel/ module, and `import k4flash`
    (what the app's early checks pay for) loads neither torch nor parallel/."""
    library = [module_name(p) for p in sorted((ROOT / "k4flash").glob("*.py")) if p.name != "__init__.py"]
    code = ("import sys; import k4flash; assert 'torch' not in sys.modules; "
            f"import {', '.join(library)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'parallel' or m.startswith('k4flash.app')); "
            "assert not bad, bad; print(len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_diffusers_is_imported_only_to_load_a_vae(tiny_weights):
    """diffusers takes seconds to import, paid by every rank of every launch and by the test collection:
    importing the library, parallel/ and the app loads it not at all; loading a VAE does."""
    modules = [module_name(p) for folder in ("k4flash", "parallel", "k4flash/app")
               for p in sorted((ROOT / folder).glob("*.py")) if p.name not in ("__init__.py", "__main__.py")]
    code = (f"import sys; import {', '.join(modules)}; assert 'diffusers' not in sys.modules, 'imported'; "
            "import k4flash.vae as v; v.load_vae(sys.argv[1]); "
            "assert 'diffusers' in sys.modules, 'never'")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_weights / "vae")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_code_cites_only_documents_in_the_repo():
    """Every `docs/<name>.md "<Section>"` in code, config and launchers names a real file and heading,
    and nothing cites the spec the docs were written from (it is not in the repo)."""
    import re

    files = [p for pattern in ("*.py", "*.yaml", "*.sh", "*.sbatch") for p in ROOT.rglob(pattern)
             if ".git" not in p.parts and p.name != "test_layers.py"]
    headings = {doc.name: {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")}
                for doc in (ROOT / "docs").glob("*.md")}
    cited, problems = 0, []
    for path in files:
        text = path.read_text()
        if re.search(r"\bS[P]EC\b", text):  # the bracket keeps this line itself from matching
            problems.append(f"{path.relative_to(ROOT)} cites the spec the docs were written from")
        for name, section in re.findall(r'docs/([\w-]+\.md)(?:\s+"([^"]+)")?', text):
            cited += 1
            if name not in headings:
                problems.append(f"{path.relative_to(ROOT)} cites docs/{name}, which does not exist")
            elif section and section not in headings[name]:
                problems.append(f"{path.relative_to(ROOT)} cites docs/{name} \"{section}\", no such heading")
    assert not problems, "\n".join(problems)
    assert cited > 20  # the check saw the citations
