"""The folders show the architecture: imports run down the floors core < data < ml < stages < engine,
the engine (pipeline/) imports no library floor (it reaches data, ml and stages by name, through
pipeline/library.py and pipeline/stage_registry.py), and knows stages only by their declarations, never by name."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "data", "ml", "stages")
FLOORS = ("core", "data", "ml", "stages", "engine")
STAGE_NAMES = re.compile(r"(?<![\w-])(teacher|pseudolabels?|mart|eval)\b")
# Helper C's modules (report, sweep results) still name the built-in stages until that work is merged.
NOT_YET_GENERIC: set[str] = set()


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def floor(module: str) -> str | None:
    """The floor of one of our modules; None for the standard library and third-party packages."""
    if module == "pipeline.stage" or module == "pipeline.core" or module.startswith("pipeline.core."):
        return "core"  # the contract between engine and stages sits with the leaf utilities
    if module == "pipeline" or module.startswith("pipeline."):
        return "engine"
    top = module.split(".")[0]
    return top if top in ("data", "ml", "stages") else None


def imported(tree: ast.AST):
    """Every module an import statement names, at any depth (the lazy imports inside functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative imports hide the floor an import reaches"
            for alias in node.names:  # `from pipeline import stage_registry` imports the module pipeline.stage_registry
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                yield node.lineno, sub if is_module else node.module


def test_imports_run_down_the_floors_only():
    upward = []
    for path, module in modules():
        own = floor(module)
        for line, name in imported(ast.parse(path.read_text())):
            theirs = floor(name)
            if theirs is not None and FLOORS.index(theirs) > FLOORS.index(own):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {name} ({theirs})")
    assert upward == []


def test_the_engine_imports_no_library_floor():
    """Not even lazily inside a function: what it needs of data, ml and stages comes through its registries."""
    reached = []
    for path, module in modules():
        if floor(module) == "engine":
            reached += [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in
                        imported(ast.parse(path.read_text())) if floor(name) in ("data", "ml", "stages")]
    assert reached == []


def test_the_engine_names_library_modules_only_in_its_registries():
    """The strings that name a module of data, ml or stages sit in the two registry modules, where a
    reader looks for them (the stage registry names the `stages` package)."""
    named = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name in ("library.py", "stage_registry.py"):
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        named += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and re.fullmatch(r"(data|ml|stages)(\.\w+)*(:\w+)?", node.value)]
    assert named == []


def test_the_public_model_api_still_comes_from_the_engine():
    import pipeline
    from ml import checkpoints, models

    assert pipeline.load_model is checkpoints.load_model and pipeline.build_model is models.build_model


def test_the_floor_rules_catch_an_upward_import():
    tree = ast.parse("def f():\n    from pipeline.config import load_config\nfrom pipeline import stage_registry\n")
    assert [floor(name) for _, name in imported(tree)] == ["engine", "engine"]
    assert floor("pipeline.stage") == floor("pipeline.core.errors") == "core"
    assert floor("torch") is None and floor("stages.mart") == "stages"


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def stage_names_in(source: str) -> list[str]:
    """Stage names in code: string constants (docstrings, the documentation, excepted), identifiers,
    attributes and imports. Comments are not code."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.alias):
            text = node.name
        if text is not None and STAGE_NAMES.search(text):
            found.append(f"{node.lineno}: {text[:80]!r}")
    return found


def test_the_engine_never_names_a_stage():
    named = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in NOT_YET_GENERIC:
            named += [f"{rel}:{hit}" for hit in stage_names_in(path.read_text())]
    assert named == []


def test_the_naming_rule_catches_a_stage_name():
    assert stage_names_in("x = config.mart.beta\n") and stage_names_in("y = ['eval']\n")
    assert stage_names_in("from stages import teacher\n")
    assert stage_names_in('"""Docs may say teacher."""\nz = "rst-mart"\n') == []
