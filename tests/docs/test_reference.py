"""The generated reference pages (scripts/gen_docs.py): current with the code, complete, and built from the
dataclasses' own comments and RANGES."""
import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
from typing import ClassVar

from pipeline.cli import build_parser
from pipeline.config import Config
from pipeline.core.checks import Range, at_least
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_docs)

REGENERATE = "is stale: run `python scripts/gen_docs.py` and commit docs/reference/"


def test_the_config_reference_is_current():
    assert gen_docs.CONFIG_PAGE.read_text() == gen_docs.config_page(), f"{gen_docs.CONFIG_PAGE} {REGENERATE}"


def test_the_cli_reference_is_current():
    assert gen_docs.CLI_PAGE.read_text() == gen_docs.cli_page(), f"{gen_docs.CLI_PAGE} {REGENERATE}"


def test_every_key_of_every_section_is_listed_with_its_unit():
    page = gen_docs.config_page()
    sections = page.split("\n## [")
    by_name = {part.split("]", 1)[0]: part for part in sections[1:]}
    for name, values in vars(Config()).items():
        if type(values).__module__.split(".")[0] not in gen_docs.PROJECT_PACKAGES:
            continue  # a plug-in installed in this environment (the next test)
        assert name in by_name, f"section [{name}] missing from the config reference"
        for field in dataclasses.fields(values):
            if field.type in (dict, "dict"):
                continue  # pass-through keys (pool provider options) are described under the table
            row = next((line for line in by_name[name].splitlines() if line.startswith(f"| `{field.name}` |")), None)
            assert row is not None, f"{name}.{field.name} missing from the config reference"
            unit = row.split(" | ")[3]
            assert unit.strip(), f"{name}.{field.name} has no comment with its unit or meaning beside its field"


def test_every_command_and_flag_is_listed():
    page = gen_docs.cli_page()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        section = page.split(f"\n## {name}\n", 1)
        assert len(section) == 2, f"command {name} missing from the CLI reference"
        body = section[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in body or f" {flag} " in body or f", {flag}" in body, \
                        f"{name} {flag} missing from the CLI reference"


@dataclasses.dataclass
class _SharedRecipe:
    epochs: int = 10  # passes over the data | a pipe in a comment
    where: str = ""  # the <entry> directory


@dataclasses.dataclass
class _ToySection(_SharedRecipe):
    """[toy]: a section the test declares."""

    rate: float = 0.5  # share per batch
    names: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"])  # which ones

    RANGES: ClassVar[dict] = {"epochs": at_least(1, high=100), "rate": Range(0, 1, low_open=True, meaning="a share"),
                              "where": ("", "x")}


def test_a_section_is_read_from_its_dataclass_comments_and_ranges():
    text = "\n".join(gen_docs._section("toy", _ToySection, None))
    assert "[toy]: a section the test declares." in text
    # A field declared in a base class keeps the base's comment (teacher and mart share one).
    assert "| `epochs` | `int` | `10` | passes over the data \\| a pipe in a comment | in [1, 100] |" in text
    assert "| `where` | `str` | `\"\"` | the &lt;entry> directory | one of ``, `x` |" in text
    assert "| `rate` | `float` | `0.5` | share per batch | in (0, 1] (a share) |" in text
    assert '| `names` | `list[str]` | `["a", "b"]` | which ones |  |' in text


PLUGIN = '''
from dataclasses import dataclass
from pipeline.stage import Stage

@dataclass
class ExtraConfig:
    k: int = 1  # a plug-in's key

def run(ctx):
    pass

STAGE = Stage(name="extra", version=1, section="extra", config=ExtraConfig, run=run, outputs=("x.txt",))
'''


def test_a_plugin_installed_here_stays_off_the_projects_page(tmp_path):
    """The page documents rst-mart's own sections: a third-party stage in this environment (found through
    its entry point) is registered, but --check still finds the committed page current."""
    site = tmp_path / "site"
    (site / "extra_stage").mkdir(parents=True)
    (site / "extra_stage" / "__init__.py").write_text(PLUGIN)
    info = site / "extra_stage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rst_mart.stages]\nextra = extra_stage:STAGE\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    registered = subprocess.run([sys.executable, "-c", "from pipeline.config import Config; print(vars(Config()))"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "ExtraConfig(k=1)" in registered.stdout, registered.stderr
    check = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
