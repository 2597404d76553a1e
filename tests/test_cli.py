"""The `s4v` command line's help and messages, the declared dependencies, and the files docs cite."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from s4v.cli.main import build_parser
from s4v.cli.main import main as s4v_main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_bench(capsys):
    benches = sorted(p.stem for p in (REPO / "s4v" / "bench").glob("*.py")
                     if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body))
    assert benches == ["loader", "memory", "throughput"]
    top = build_parser().format_help()
    with pytest.raises(SystemExit):
        s4v_main(["bench", "--help"])
    bench_help = capsys.readouterr().out
    for name in benches:
        assert name in top and f"\n{name}: " in bench_help, (name, top, bench_help)


def test_train_help_lists_sections_keys_defaults_and_comments(capsys):
    from s4v.train.main import main as train_main

    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    for section in ("model:", "data:", "optim:", "train:", "eval:", "engine:", "retrieval:"):
        assert f"\n{section}" in out
    assert "model.num_frames = 8  # frames per clip T" in out
    assert "train.max_skip_fraction = 0.05  # stop if more than this share" in out
    assert "data.loader = 'dali'  # decode engine" in out


def test_config_prints_the_resolved_experiment(capsys):
    assert s4v_main(["config", "ds_configs/experiments/demo_tiny.yaml", "train.epochs=3", "optim.lr=2e-3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    recipe = yaml.safe_load((REPO / "ds_configs/experiments/demo_tiny.yaml").read_text())
    assert cfg["train"]["epochs"] == 3 and cfg["optim"]["lr"] == 2e-3
    assert cfg["model"]["name"] == recipe["model"]["name"]
    assert cfg["data"]["batch_size"] == recipe["data"]["batch_size"]
    assert cfg["eval"]["max_skip_fraction"] == 0.01  # defaults filled in

    assert s4v_main(["config", "train.epochs=0"]) == 2
    assert capsys.readouterr().err.strip() == "s4v config: error: train.epochs must be >= 1, got 0"


# Import names of the declared requirements whose distribution name differs.
MODULES = {"open_clip_torch": "open_clip", "pyyaml": "yaml", "tensorboard": "torch.utils.tensorboard"}


def test_every_declared_requirement_is_imported():
    setup = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.keyword) and n.arg == "install_requires")
    names = [re.split(r"[<>=;\[ ]", c.value)[0] for c in call.value.elts]
    code = "\n".join(p.read_text() for folder in ("s4v", "data_prep") for p in (REPO / folder).rglob("*.py"))
    for name in names:
        module = MODULES.get(name, name)
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", code, re.M), f"{name} is declared but never imported"


def test_docs_and_help_cite_only_files_in_the_repository():
    """No references to the team's notes outside the tree (shared/, design/, the spec) or to docs that
    are not written yet."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".md", ".py", ".yaml", ".sh")) and not p.startswith("tests/")]
    outside = re.compile(r"shared/notes|shared/design|\.\./shared|side4video-spec|house-style\.md")
    for rel in texts:
        text = (REPO / rel).read_text(errors="replace")
        assert not outside.search(text), f"{rel} cites a file outside the repository: {outside.search(text).group()}"
        for cited in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            assert (REPO / cited).is_file(), f"{rel} cites {cited}, which is not in the repository"
    spec = re.compile(r"\bspec (section|\d)")  # the numbered sections of a design spec the repository lacks
    docs = [p for p in tracked if p == "README.md" or p.startswith(("docs/", "ds_configs/"))]
    for rel in docs:
        assert not spec.search((REPO / rel).read_text()), f"{rel} cites the spec, which is not in the repository"
    from s4v.train.main import HELP, USAGE, config_listing

    assert not spec.search(USAGE + HELP + config_listing())


def test_library_deprecation_warnings_are_quiet_at_train_start():
    """Every rank printed three FutureWarnings about torch/DeepSpeed collectives at every start."""
    import warnings

    from s4v.train.main import quiet_library_deprecations

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_deprecations()
        warnings.warn("torch.distributed.nn.functional.all_reduce is deprecated, use ...", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
