"""The floors and which way imports go, read from the source (AST), so the rule cannot drift.

    library  k4flash/*.py            single-process model, math, sampler, weights, pipeline, outputs
    parallel parallel/*.py           distributed runtime, plans, cost model and planner, from outside the library
    launch   launch/*.py             the application: Hydra schema, CLI, batches, server, torchrun wrapper
    entry    run_inference_distil.py
    facade   k4flash/__init__.py     the model card's call; routes to parallel/ under a launcher, lazily

Each top-level folder is one floor. Beside the import rule: no product module rewires another (assigns an
attribute of a module it imported), and the literal reference forward (k4flash/reference.py) stays off the
inference path.
"""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# floor → the floors it may import (its own included)
ALLOWED = {
    "library": {"library"},
    "parallel": {"library", "parallel"},
    "launch": {"library", "parallel", "launch", "facade"},
    "entry": {"launch"},
    "facade": {"library", "parallel"},
}
REFERENCE = "k4flash.reference"  # the literal reference forward: tests and benchmarks only


def floor_of(module: str):
    """The floor a dotted module name belongs to; None for anything outside the project."""
    parts = module.split(".")
    if parts[0] in ("parallel", "launch"):
        return parts[0]
    if parts[0] == "run_inference_distil":
        return "entry"
    if parts[0] != "k4flash":
        return None
    if len(parts) == 1 or not (ROOT / "k4flash" / f"{parts[1]}.py").exists():
        return "facade"  # `from k4flash import get_T2V_pipeline`: the package root, i.e. the facade
    return "library"


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
        if target_floor is None or (target_floor == floor and not target.startswith(REFERENCE)):
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if target == REFERENCE or target.startswith(REFERENCE + "."):
            out.append(f"{where}: {module} imports the reference forward, which is off the inference path")
        elif target_floor not in ALLOWED[floor]:
            out.append(f"{where}: {floor} module {module} imports {target} ({target_floor})")
        elif floor == "facade" and target_floor == "parallel" and at_top:
            out.append(f"{where}: the facade imports {target} at module level (it must stay lazy)")
    return out


FLOORS = ("k4flash", "parallel", "launch")


def project_files():
    files = [p for folder in FLOORS for p in sorted((ROOT / folder).rglob("*.py"))]
    return files + [ROOT / "run_inference_distil.py"]


def test_every_floor_imports_only_downwards():
    found = [v for path in project_files() for v in violations(path)]
    assert found == [], "\n".join(found)


def test_every_project_file_has_a_floor():
    assert {floor_of(module_name(p)) for p in project_files()} == set(ALLOWED)


@pytest.mark.parametrize("path, line", [
    ("k4flash/pipeline.py", "from parallel.rank_pipeline import load_rank_pipeline"),
    ("k4flash/pipeline.py", "    import parallel.comm"),  # a lazy import counts too
    ("k4flash/dit.py", "from launch import cli"),
    ("k4flash/weights.py", "from k4flash import get_T2V_pipeline"),  # the facade routes to parallel/
    ("k4flash/sampler.py", "from .reference import reference_forward"),
    ("parallel/planner.py", "from k4flash import reference"),
    ("parallel/tp.py", "from launch.cli import run"),
    ("parallel/health.py", "    from launch.lifecycle import Terminated"),
    ("launch/cli.py", "import run_inference_distil"),
    ("run_inference_distil.py", "from parallel.runtime import init_runtime"),  # the entry sees the app alone
    ("k4flash/__init__.py", "from parallel.rank_pipeline import load_rank_pipeline"),  # must stay lazy
])
def test_a_wrong_way_import_is_caught(path, line):
    """Negative control: the real file with one wrong-way import added fails the rule."""
    source = (ROOT / path).read_text()
    source += f"\n\ndef _added():\n{line}\n" if line.startswith("    ") else f"\n{line}\n"
    assert violations(ROOT / path) == [] and len(violations(ROOT / path, source)) == 1


def _is_module(dotted: str) -> bool:
    if (ROOT / Path(*dotted.split("."))).with_suffix(".py").exists() or (ROOT / Path(*dotted.split("."))).is_dir():
        return True
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):  # a name inside a module, not a module
        return False


def module_rewirings(source: str, module: str = "parallel.rank_work") -> list:
    """(line, what) for every place `source` (the module `module`) assigns an attribute of a module it imported
    (`comm.dist = ...`, `setattr(dit, ...)`, `del mod.x`): one module rewiring another, unseen by its reader."""
    tree = ast.parse(source)
    package = module.rpartition(".")[0]
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            modules |= {alias.asname or alias.name for alias in node.names if _is_module(f"{base}.{alias.name}")}
    found = []

    def base_name(target):
        while isinstance(target, ast.Attribute):
            target = target.value
        return target.id if isinstance(target, ast.Name) else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in modules:
                found.append((node.lineno, f"{node.func.id}({node.args[0].id}, ...)"))
        targets = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        for target in targets:
            if isinstance(target, ast.Attribute) and base_name(target) in modules:
                found.append((node.lineno, ast.unparse(target)))
    return found


def test_no_module_rewires_another():
    """A product module never assigns attributes of a module it imports: seams are explicit (the DiT's
    `attention` and `sequence`, comm's backend), so what runs is what the reader of each module sees."""
    found = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in project_files()
             for line, what in module_rewirings(path.read_text(), module_name(path))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("line", ["comm.dist = None", "    dit.joint_attention = lambda q, k, v: q",
                                  "setattr(comm, 'all_to_all', None)", "cost.H100_SXM.name = 'x'"])
def test_a_rewiring_is_caught(line):
    """Negative control: the counting module with a rewiring of parallel.comm or k4flash.dit added."""
    source = (ROOT / "parallel" / "rank_work.py").read_text() + "\nfrom k4flash import dit\n"
    source += f"\n\ndef _added():\n{line}\n" if line.startswith("    ") else f"\n{line}\n"
    assert module_rewirings((ROOT / "parallel" / "rank_work.py").read_text()) == []
    assert len(module_rewirings(source)) == 1


def test_the_library_runs_without_parallel_and_the_facade_without_torch():
    """At run time too: importing every library module loads no parallel/ module, and `import k4flash`
    (what the app's early checks pay for) loads neither torch nor parallel/."""
    library = [module_name(p) for p in sorted((ROOT / "k4flash").glob("*.py")) if p.name != "__init__.py"]
    code = ("import sys; import k4flash; assert 'torch' not in sys.modules; "
            f"import {', '.join(library)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('parallel', 'launch')); "
            "assert not bad, bad; print(len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_diffusers_is_imported_only_to_load_a_vae_and_t5_only_to_encode(tiny_weights):
    """diffusers and transformers' T5 take seconds each to import, paid by every rank of every launch and by the
    test collection: importing the library (but its T5 wrapper), parallel/ and the app loads neither; a rank that
    loads the VAE but does not encode (a multi-rank run's other ranks) loads diffusers and not T5; the rank that
    encodes loads T5."""
    modules = [module_name(p) for folder in FLOORS for p in sorted((ROOT / folder).glob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and module_name(p) != "k4flash.text_encoder"]
    t5 = "transformers.models.t5.modeling_t5"
    code = "\n".join([
        f"import sys; import {', '.join(modules)}",
        f"assert not {{'diffusers', '{t5}'}} & set(sys.modules), 'imported'",
        "from k4flash.pipeline import Role, load_pipeline; from k4flash.tiny import TINY_DIT_PARAMS",
        "class Other(Role): is_group_main = False",
        "load = lambda role: load_pipeline('cpu', cache_dir=sys.argv[1], dit_params=TINY_DIT_PARAMS, download=False, "
        "role=role)",
        "load(Other())",
        f"assert 'diffusers' in sys.modules and '{t5}' not in sys.modules, 'a rank that does not encode imported T5'",
        "load(Role())",
        f"assert '{t5}' in sys.modules, 'never'"])
    result = subprocess.run([sys.executable, "-c", code, str(tiny_weights)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_code_cites_only_documents_in_the_repo():
    """Every `docs/<name>.md "<Section>"` in code, config and launchers names a real file and heading,
    and nothing cites the spec the docs were written from (it is not in the repo)."""
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


def missing_from_architecture(readme: str, paths) -> list:
    """The paths (relative to the checkout) that no row of the README's Architecture table names in its first
    column, as `path`."""
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            named |= set(re.findall(r"`([^`]+)`", row.split(" | ")[0]))
    return sorted(str(p) for p in paths if str(p) not in named)


def test_the_readme_architecture_table_names_every_module():
    """Every Python file of the floors has its line in README "Architecture" (a new module without one fails);
    negative control: a module the table does not know is reported."""
    readme = (ROOT / "README.md").read_text()
    files = [p.relative_to(ROOT) for p in project_files()]
    assert len(files) > 40
    assert missing_from_architecture(readme, files) == []
    assert missing_from_architecture(readme, [*files, Path("parallel/new_module.py")]) == ["parallel/new_module.py"]
