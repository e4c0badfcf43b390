"""The docs as a contract: every `dfl ...` line in README.md and docs/*.md parses with the real
click commands, and docs/cli.md is what tools/gen_cli_reference.py generates from them."""
from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path
from typing import Iterator

import click
import pytest

from dfl_tf.cli import main
from tests.helpers import REPO as ROOT, import_script

SKIP = {".venv", ".git", "build", "dist", "demo_out", ".pytest_cache", "node_modules"}
DOCS = sorted([*ROOT.glob("*.md"),  # README.md, docs/, saved_models/, benchmarks/, tests/fixtures/, ...
               *(p for top in ROOT.iterdir() if top.is_dir() and top.name not in SKIP
                 and not top.name.endswith(".egg-info") for p in top.rglob("*.md"))])
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "&"}


def shell_commands(markdown: str) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every `dfl` command in the markdown's shell code blocks.

    Continuation lines (trailing backslash) are joined, `#` comments and a leading `$ ` prompt are
    dropped, and a line is cut at `&&`, `;`, pipes and redirections.
    """
    found = []
    for block in SHELL_BLOCK.finditer(markdown):
        first_line = markdown.count("\n", 0, block.start(1)) + 1
        logical, start = "", None
        for offset, raw in enumerate(block.group(1).splitlines()):
            line = raw.rstrip()
            if start is None:
                start = first_line + offset
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            text = logical.strip()
            logical, lineno, start = "", start, None
            text = text[2:] if text.startswith("$ ") else text
            lexer = shlex.shlex(text, posix=True, punctuation_chars="&|;<>")
            lexer.whitespace_split, lexer.commenters = True, "#"
            command: list[str] = []
            for token in [*lexer, ";"]:
                if token in SEPARATORS or set(token) <= set("&|;<>"):
                    if command and command[0] == "dfl":
                        found.append((lineno, command[1:]))
                    command = []
                else:
                    command.append(token)
    return found


@contextlib.contextmanager
def _paths_need_not_exist() -> Iterator[None]:
    """Docs name example files (slide.svs, a checkpoint): parse them without checking the disk."""
    changed = []
    for command in main.commands.values():
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                changed.append((param, param.type))
                param.type = click.Path(dir_okay=param.type.dir_okay, file_okay=param.type.file_okay)
    try:
        yield
    finally:
        for param, old in changed:
            param.type = old


def parse(argv: list[str]) -> str:
    """Parse ``dfl ARGV`` with the real commands without running them; the command name.

    Missing required options and arguments, unknown flags, bad choices and bad numbers raise
    click.UsageError (BadParameter, NoSuchOption, MissingParameter).
    """
    with _paths_need_not_exist():
        try:
            ctx = main.make_context("dfl", list(argv), resilient_parsing=False)
        except click.exceptions.Exit:  # dfl --help / --version
            return ""
        with ctx:
            name, command, rest = main.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
            try:
                command.make_context(name, rest, parent=ctx, resilient_parsing=False)
            except click.exceptions.Exit:  # dfl CMD --help
                pass
    return name


def _documented() -> list[tuple[str, int, list[str]]]:
    return [(doc.relative_to(ROOT).as_posix(), lineno, argv)
            for doc in DOCS for lineno, argv in shell_commands(doc.read_text())]


def test_docs_have_dfl_lines_for_every_command():
    used = {argv[0] for _, _, argv in _documented() if argv and not argv[0].startswith("-")}
    assert set(main.commands) <= used, f"commands without an example in a shell block: {set(main.commands) - used}"


@pytest.mark.parametrize("doc,lineno,argv", [pytest.param(*d, id=f"{d[0]}:{d[1]}") for d in _documented()])
def test_documented_command_parses(doc, lineno, argv):
    synopsis = [a for a in argv if a.startswith("[") or a.endswith("]") or a.endswith("...")]
    assert not synopsis, f"{doc}:{lineno}: write a runnable example, not a synopsis ({synopsis})"
    try:
        parse(argv)
    except click.UsageError as exc:
        pytest.fail(f"{doc}:{lineno}: dfl {shlex.join(argv)}\n  -> {exc.format_message()}")


def test_parser_rejects_what_users_would_get_wrong():
    md = ("```bash\ndfl select data.csv --backbones resnet50   # no --out\n"
          "dfl train emb --out h --dropuot 0.1 && echo ok\n"
          "dfl extract d --out e \\\n    --fit crop\n"
          "dfl export h --out m --version one\n"
          "```\n")
    commands = shell_commands(md)
    assert [argv[0] for _, argv in commands] == ["select", "train", "extract", "export"]
    assert commands[2] == (4, ["extract", "d", "--out", "e", "--fit", "crop"])
    errors = []
    for _, argv in commands:
        with pytest.raises(click.UsageError) as info:
            parse(argv)
        errors.append(info.value.format_message())
    assert "--out" in errors[0] and "--dropuot" in errors[1] and "crop" in errors[2] and "one" in errors[3]
    assert parse(["tile", "no/such/slide.svs", "--out", "t.csv", "--mpp", "20x"]) == "tile"
    assert parse(["import-weights", "missing.pth", "--arch", "dino_resnet50", "--out", "w.weights.h5"])


def test_architecture_map_is_current():
    gen_architecture = import_script("tools", "gen_architecture")
    reference = ROOT / "docs" / "architecture.md"
    assert reference.exists(), "docs/architecture.md missing: run `make docs`"
    assert reference.read_text() == gen_architecture.render(), (
        "docs/architecture.md is stale: run `make docs` (python tools/gen_architecture.py)")
    # every module of dfl_tf has its line: `dfl_tf/cli.py` at the top, `vit.py` in its package's table
    text = reference.read_text()
    for path in (ROOT / "dfl_tf").rglob("*.py"):
        rel = path.relative_to(ROOT / "dfl_tf")
        if path.name != "__init__.py":
            assert (f"`dfl_tf/{rel}`" if len(rel.parts) == 1 else f"| `{rel.relative_to(rel.parts[0])}` |") in text, rel


def test_cli_reference_is_current():
    gen_cli_reference = import_script("tools", "gen_cli_reference")
    reference = ROOT / "docs" / "cli.md"
    assert reference.exists(), "docs/cli.md missing: run `make docs`"
    assert reference.read_text() == gen_cli_reference.render(main), (
        "docs/cli.md is stale: run `make docs` (python tools/gen_cli_reference.py)")
    text = reference.read_text()
    top = text.split("\n## ", 1)[0]  # the options given before the command
    assert all(f"`{opt}`" in top for param in main.params if not param.is_eager for opt in param.opts)
    for name, command in main.commands.items():
        assert f"## `dfl {name}`" in text
        section = text.split(f"## `dfl {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    assert f"`{opt}`" in section, (name, opt)


def _tf_serving_entries(text: str) -> list[str]:
    """The `config { ... }` entries of a models.config text, comments dropped, whitespace normalised."""
    text = re.sub(r"#[^\n]*", "", text)
    return [" ".join(m.split()) for m in re.findall(r"config\s*\{(.*?\})\s*\}", text, re.S)]


def test_shipped_models_config_serves_what_the_readme_calls():
    readme = (ROOT / "README.md").read_text()
    shipped = _tf_serving_entries((ROOT / "saved_models" / "models.config").read_text())
    shown = next(b for b in re.findall(r"```\n(model_config_list.*?)```", readme, re.S))
    assert _tf_serving_entries(shown) == shipped, "README's models.config differs from saved_models/models.config"
    served = {re.search(r'name: "([^"]+)"', e).group(1): e for e in shipped}
    for name, entry in served.items():
        assert f'base_path: "/models/{name}"' in entry
    called = set(re.findall(r"/v1/models/([\w-]+):predict", readme))
    called |= set(re.findall(r'model_spec\.name[^=]*= "([\w-]+)"', readme))
    assert called and called <= set(served), f"examples call {called}, models.config serves {set(served)}"
    assert "demo" in served  # what `make demo` exports


def test_every_option_has_a_help_text():
    missing = [f"dfl {name} {param.opts[0]}" for name, command in [("", main), *main.commands.items()]
               for param in command.params if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing, f"options without help text (shown in docs/cli.md): {missing}"


# Flags of other tools that the README's prose mentions (pip, benchmarks/run_all.py).
OTHER_TOOLS_FLAGS = {"--no-deps", "--only", "--quick", "--repeats", "--export", "--sets", "--batch-sizes", "--samplers"}  # pip, benchmarks/*.py


def test_flags_named_in_prose_exist():
    known = {opt for command in [main, *main.commands.values()] for param in command.params
             if isinstance(param, click.Option) for opt in param.opts + param.secondary_opts} | {"--help"}
    for doc in DOCS:
        if doc.relative_to(ROOT).parts[0] == "benchmarks":  # describes the benchmark scripts' own flags
            continue
        prose = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
        named = {flag for span in re.findall(r"`([^`\n]+)`", prose)
                 for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)}
        unknown = named - known - OTHER_TOOLS_FLAGS
        assert not unknown, f"{doc.relative_to(ROOT)} names flags no dfl command has: {sorted(unknown)}"


NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?=[x%k]?(?![A-Za-z0-9]))")


def _numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in NUMBER.findall(text)}


def summary_mismatches(readme: str, results_md: str) -> list[str]:
    """Figures and run dates in README's bench-summary block that results.md does not print."""
    block = readme.split("<!-- bench-summary:start", 1)[1].split("<!-- bench-summary:end -->", 1)[0]
    printed, problems = _numbers(results_md), []
    rows = [line.split("|") for line in block.splitlines() if line.startswith("|")][2:]  # after header + rule
    for cells in rows:
        missing = _numbers(cells[2]) - printed
        if missing:
            problems.append(f"row '{cells[1].strip()}' quotes {sorted(missing)}, not in results.md")
        run = cells[4].strip() if len(cells) > 5 else ""
        if run not in ("", "-") and run not in results_md:
            problems.append(f"row '{cells[1].strip()}': run date {run} not in results.md")
    return problems


def test_readme_benchmark_summary_quotes_results_md():
    """The README's benchmark summary quotes only figures (and run dates) that benchmarks/results.md prints."""
    problems = summary_mismatches((ROOT / "README.md").read_text(),
                                  (ROOT / "benchmarks" / "results.md").read_text())
    assert not problems, problems
