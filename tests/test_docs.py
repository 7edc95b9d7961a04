"""The docs run: every command in a fenced shell block of the README, docs/ and the ops
runbook parses with the real CLI or names a real make target, and is run by a named test
(or by CI). A command added to the docs without one fails here."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from tipgraph_ops.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "k3s" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^ *```(?:bash|sh|shell)\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")

# Each documented command, by its key, and what runs it: "tests/<file>::<test>" or "CI".
EXERCISED: dict[str, list[str]] = {
    "make run": [
        "tests/test_serve_command.py::test_the_readme_curl_examples_work_against_tipgraph_serve"
    ],
    "make test": ["CI"],
    "make unit": ["CI"],  # make test's pytest run is a superset
    "make lint": ["CI"],
    "make tune": ["tests/test_sweep.py::test_python_m_tuning_sweep_runs_from_a_config_file"],
    "make render-k3s": ["tests/test_k3s.py::test_serve_config_patches_match_the_configs"],
    "make render-serve-config": ["tests/test_settings.py::test_check_command_detects_drift"],
    "make compare-policies": [
        "tests/test_simulator.py::test_cli_in_process_simulation_and_policy_comparison"
    ],
    "tipgraph serve": [
        "tests/test_serve_command.py::test_the_documented_metrics_endpoint_serves_tipgraph_metrics",
        "tests/test_serve_command.py::test_ctrl_c_writes_every_buffered_decision_and_exits_0",
    ],
    "tipgraph simulate": ["tests/test_e2e.py::test_simulator_drives_the_graph"],
    "tipgraph tune": ["tests/test_sweep.py::test_a_bad_tuning_config_is_a_clear_error"],
    "python -m tuning.sweep": [
        "tests/test_sweep.py::test_python_m_tuning_sweep_runs_from_a_config_file"
    ],
    "tipgraph promote": [
        "tests/test_registry.py::test_promote_rollback_and_registry_commands_print_only_their_own_lines",
        "tests/test_e2e.py::test_the_documented_promotion_path_under_load",
    ],
    "tipgraph rollback": [
        "tests/test_registry.py::test_promote_rollback_and_registry_commands_print_only_their_own_lines"
    ],
    "tipgraph registry": [
        "tests/test_registry.py::test_promote_rollback_and_registry_commands_print_only_their_own_lines"
    ],
    "tipgraph status": [
        "tests/test_e2e.py::test_status_reports_the_running_graph_the_champion_and_the_backlog",
        "tests/test_serve_command.py::test_status_shows_the_served_graph",
    ],
    "tipgraph export": [
        "tests/test_cli.py::test_export_writes_the_import_format_and_imports_back_to_the_same_events"
    ],
    "tipgraph migrate": [
        "tests/test_cli.py::test_migrate_brings_a_new_store_to_the_latest_schema_idempotently"
    ],
    "tipgraph report": [
        "tests/test_cli.py::test_report_through_the_cli_names_configured_shadows_without_data",
        "tests/test_report.py::test_cli_entry_points_render_with_filters",
    ],
    "tipgraph config show": ["tests/test_cli.py::test_config_show_as_json"],
    "tipgraph guardrails": [
        "tests/test_guardrails.py::test_a_crossed_guardrail_fails_status_and_rolls_the_champion_back"
    ],
    "tipgraph retention": [
        "tests/test_cli.py::test_retention_run_deletes_the_expired_decisions_and_keeps_the_rewards"
    ],
    "tipgraph token": [
        "tests/test_auth.py::test_token_new_prints_the_token_once_and_entries_that_append_to_a_file"
    ],
    "tipgraph render-config-docs": [
        "tests/test_cli.py::test_the_configuration_reference_matches_the_settings_model"
    ],
    "tipgraph --help": ["tests/test_docs.py::test_every_command_has_help"],
    "tipgraph rehearse": [
        "tests/test_rehearsal.py::"
        "test_the_short_rehearsal_scales_generation_alone_and_survives_a_node_loss"
    ],
    "curl": ["tests/test_e2e.py::test_readme_curl_examples_work"],
    "tee": ["tests/test_e2e.py::test_readme_curl_examples_work"],  # in the curl block
}
# Run by hand, with their results written down, not by CI: they need a quiet machine or the
# package registry, and take minutes.
BY_HAND = {
    "make bench": "BENCHMARKS.md",
    "make bench-levers": "BENCHMARKS.md",
    "make bench-profile": "BENCHMARKS.md",
    "make bench-cpu": "BENCHMARKS.md",
    "make bench-candidates": "BENCHMARKS.md",
    "make bench-test-times": "BENCHMARKS.md",
    "make bench-shadows": "BENCHMARKS.md",
    "make bench-bus": "BENCHMARKS.md",
    "make bench-policies": "BENCHMARKS.md",
    "make bench-tuning": "BENCHMARKS.md",
    "make bench-log-size": "BENCHMARKS.md",
    "make bench-log-scale": "BENCHMARKS.md",
    "make bench-pool": "BENCHMARKS.md",
    "make bench-embeddings": "BENCHMARKS.md",
    "make bench-drift": "BENCHMARKS.md",
    "make rehearsal": "BENCHMARKS.md and k3s/README.md (CI runs `tipgraph rehearse --short`)",
    "make lock": "re-resolves the lockfiles against the registry",
    "mlflow ui": "MLflow's own UI",
}
# The runbook's cluster commands: no cluster here. What they apply is checked offline
# (tests/test_k3s.py builds every overlay and validates it against the KubeRay CRDs).
# sudo: preparing a node; curl against the cluster's MLflow is the same curl as above.
CLUSTER_ONLY = {
    "kubectl",
    "helm",
    "docker",
    "cat",
    "rm",
    "openssl",
    "head",
    "watch",
    "sudo",
    "base64",
}


def _shell_commands(text: str) -> list[list[str]]:
    """The commands of the fenced shell blocks as word lists: continuations and quoted
    multi-line bodies joined, comments, heredoc bodies and redirections dropped, ``&&`` /
    ``|`` chains split."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        pending = ""
        heredoc_end = None
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if heredoc_end is not None:
                heredoc_end = None if line.strip() == heredoc_end else heredoc_end
                continue
            pending = f"{pending}\n{line}" if pending else line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:
                continue  # a quote still open: the command goes on on the next line
            pending = ""
            if "<<EOF" in words:
                heredoc_end = "EOF"
            chain: list[str] = []
            redirected = False
            for word in [*words, "&&"]:
                if redirected:  # the file of a redirection is no argument
                    redirected = False
                elif word in (">", ">>", "<"):
                    redirected = True
                elif word in ("&&", "||", "|", ";"):
                    if chain:
                        commands.append(chain)
                    chain = []
                else:
                    chain.append(word)
    return commands


def _command_key(words: list[str]) -> tuple[str, list[str]] | None:
    """("tipgraph status", the argv after "tipgraph") for a command, or None for a helper
    inside another example (python3 -c in the curl block)."""
    while words and ASSIGNMENT.match(words[0]):
        inner = words[0].split("$(", 1)
        # X=$(kubectl ...): the command inside counts
        words = [*inner[1].split(), *words[1:]] if len(inner) == 2 else words[1:]
    if not words:
        return None
    if words[0] == "kubectl" and "--" in words:
        after = words[words.index("--") + 1 :]  # kubectl exec ... -- tipgraph promote
        if after[:1] == ["tipgraph"]:
            words = after
    program = Path(words[0]).name
    if program == "tipgraph":
        argv = words[1:]
        positional = [w for w in argv if not w.startswith("-")]
        if "--config" in argv:
            positional.remove(argv[argv.index("--config") + 1])
        sub = " ".join(positional[:2] if positional[:1] == ["config"] else positional[:1])
        return (f"tipgraph {sub}" if sub else f"tipgraph {argv[0]}"), argv
    if program == "make":
        return f"make {words[1]}", words[1:]
    if program in ("python", "python3"):
        return (f"python -m {words[2]}", words[3:]) if words[1:2] == ["-m"] else None
    if program == "mlflow":
        return f"mlflow {words[1]}", words[1:]
    return program, words[1:]


def documented() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in DOCS:
        for words in _shell_commands(path.read_text(encoding="utf-8")):
            keyed = _command_key(words)
            if keyed is not None:
                found.append((str(path.relative_to(ROOT)), *keyed))
    return found


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_the_docs_have_commands_to_check() -> None:
    keys = {key for _, key, _ in documented()}
    assert {"make run", "make test", "tipgraph status", "curl", "kubectl"} <= keys


def test_every_documented_command_is_run_by_a_test_ci_or_by_hand() -> None:
    unaccounted = sorted(
        f"{doc}: {key}"
        for doc, key, _ in documented()
        if key not in EXERCISED and key not in BY_HAND and key not in CLUSTER_ONLY
    )
    assert not unaccounted, f"documented but run by nothing: {unaccounted}"


@pytest.mark.parametrize("key", sorted(EXERCISED))
def test_the_tests_named_for_a_command_exist(key: str) -> None:
    for runner in EXERCISED[key]:
        if runner == "CI":
            assert key.removeprefix("make ") in {"test", "unit", "lint"}
            continue
        file, name = runner.split("::")
        assert name in _test_names(ROOT / file), f"{key}: {runner} does not exist"


def test_every_documented_tipgraph_command_parses() -> None:
    parser = build_parser()
    for doc, key, argv in documented():
        if not key.startswith("tipgraph"):
            continue
        if "--help" in argv:
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args(argv)
            assert exit_.value.code == 0, f"{doc}: {key}"
        else:
            parser.parse_args(argv)  # argparse exits 2 on an unknown command or option


def test_every_documented_make_target_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.MULTILINE))
    documented_targets = {argv[0] for _, key, argv in documented() if key.startswith("make ")}
    assert documented_targets - targets == set()


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    commands = ["serve", "simulate", "tune", "promote", "rollback", "report", "export"]
    commands += ["status", "migrate", "config", "registry"]
    for command in commands:
        assert command in listed
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: tipgraph {command}")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"{doc.name}: no #{anchor}"
