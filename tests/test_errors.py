"""One error base: every error itae raises for a user to fix is an ``itae.ItaeError`` (and still the builtin
it was); the command line prints those as one line in its own words and shows anything else as a bug."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import itae
from itae import errors
from itae.cli import main as cli

SRC = Path(itae.__file__).parent

# Each public error, where it has always been importable from, and the builtin it was before ItaeError.
PUBLIC = [
    ("itae.models", "UnsupportedModelError", TypeError),
    ("itae.models.adapters", "UnsupportedModelError", TypeError),
    ("itae", "ModelLoadError", ValueError),
    ("itae.models.loading", "ModelLoadError", ValueError),
    ("itae._lock", "FolderInUseError", RuntimeError),
    ("itae.data.store", "StoreError", ValueError),
    ("itae.data", "DecodeError", Exception),
    ("itae.data.decode", "DecodeError", Exception),
    ("itae.bench.datasets", "DatasetLoadError", ValueError),
]


@pytest.mark.parametrize(("module", "name", "builtin"), PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_each_public_error_is_an_itae_error_and_still_its_old_builtin(module, name, builtin):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, itae.ItaeError) and issubclass(cls, builtin)


def test_the_hierarchy_keeps_the_builtins_that_callers_catch():
    assert itae.ItaeError is errors.ItaeError and issubclass(itae.ItaeError, Exception)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ItaeError), name
    expected = {
        "ConfigError": ValueError, "ConfigTypeError": TypeError, "InputError": ValueError,
        "InputTypeError": TypeError, "InputIndexError": IndexError, "StoreError": ValueError,
        "ModelLoadError": ValueError, "UnsupportedModelError": TypeError, "ResourceError": RuntimeError,
        "MissingDependencyError": ImportError, "FolderInUseError": RuntimeError,
    }
    for name, builtin in expected.items():
        assert issubclass(getattr(errors, name), builtin), name
    assert issubclass(errors.ConfigTypeError, errors.ConfigError)
    assert issubclass(errors.DecodeError, errors.InputError) and errors.DecodeError("empty").reason == "empty"
    assert str(errors.InputIndexError("block 9 is out of range")) == "block 9 is out of range"  # not quoted


def test_validation_raises_the_matching_subclass():
    from itae.data.sources import open_source
    from itae.methods import TTRConfig

    with pytest.raises(errors.ConfigError, match="alpha"):
        itae.ITAEConfig(alpha=2.0)
    with pytest.raises(errors.ConfigTypeError):
        itae.ITAEConfig(layers=("a",))
    with pytest.raises(errors.ConfigError, match="top_k"):
        TTRConfig(top_k=-1)
    with pytest.raises(errors.InputError, match="n_clusters must be"):
        itae.cluster(np.zeros((5, 4), np.float32), k=0)
    with pytest.raises(errors.InputTypeError):
        itae.cluster(np.zeros((5, 4), np.float32), k=2, spherical="yes")
    with pytest.raises(errors.InputError, match="labels must be one of"):
        open_source(".", labels="sometimes")


def _literal_strings(path: Path):
    """The string constants of a module, less its docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_library_raises_no_bare_builtin_and_names_no_command_line_flag():
    """Outside the command line: user errors are ItaeErrors, and messages name parameters, not flags (the
    command line maps them). CSS custom properties (``--fg:``, ``var(--fg)``) are not flags."""
    flag = re.compile(r"(?<![\w(`-])--[a-z][a-z0-9-]*(?![\w:-])")
    bare, flags = [], []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"raise (ValueError|TypeError|IndexError|ImportError)\(", text):
            bare.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}")
        flags += [f"{rel}:{line}: {s[:60]!r}" for line, s in _literal_strings(path) if flag.search(s)]
    assert not bare, bare
    assert not flags, flags


def test_the_command_line_writes_parameter_names_as_its_flags():
    assert cli.with_flags("use a smaller batch_size or precision='bf16'") == "use a smaller --batch-size or --precision bf16"
    assert cli.with_flags("pass overwrite=True to replace it") == "pass --overwrite to replace it"
    assert cli.with_flags("choose one with split=...") == "choose one with --split ..."
    assert cli.with_flags("must be embedded with the same model: pass model=None") == (
        "must be embedded with the same model: pass no --model")
    # not a parameter there: inside a path, an attribute, a quote, a Python call shown in the message
    for text in ("cannot read '/data/batch_size/x.png'", "ITAEConfig.layers has duplicates",
                 "the model's 'model_root' in a spec", "datasets.load_dataset('x', split='train')",
                 "the model gave 3 values"):
        assert cli.with_flags(text) == text
    assert set(cli.PARAMETER_FLAGS.values()) <= {
        opt for action in cli.build_parser()._subparsers._group_actions[0].choices.values()
        for a in action._actions for opt in a.option_strings}  # every flag of the table exists


def test_a_library_error_naming_a_parameter_is_printed_with_its_flag(monkeypatch, capsys):
    def fails(args):
        raise errors.StoreError("the store holds other settings; lower batch_size or pass overwrite=True")

    monkeypatch.setattr(cli, "cmd_evaluate", fails)
    assert cli.main(["evaluate", "nowhere.csv"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err == "itae: error: the store holds other settings; lower --batch-size or pass --overwrite\n"


def test_bad_input_is_one_line_in_the_command_line_words(tmp_path, capsys):
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "a.png")
    out = tmp_path / "store"
    rc = cli.main(["embed", str(data), "-o", str(out), "--model", "demo-dinov2", "--no-itae", "--device", "mps",
                   "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == ("itae: error: device 'mps' was asked for but MPS is not available; use --device auto or "
                   "--device cpu\n"), err
    assert not out.exists()  # the folder it created is removed again


def test_a_library_error_from_the_real_check_names_the_flag(tmp_path, capsys):
    rc = cli.main(["check", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "--outlier-z", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "itae: error: --outlier-z must be positive; got -1.0\n", err


def test_an_unexpected_exception_is_a_bug_with_its_traceback_and_where_to_report_it(monkeypatch, capsys):
    def broken(args):
        return {}["missing key"]

    monkeypatch.setattr(cli, "cmd_evaluate", broken)
    rc = cli.main(["evaluate", "nowhere.csv"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BUG != cli.EXIT_ERROR
    assert "Traceback (most recent call last)" in err and "KeyError: 'missing key'" in err
    last = err.strip().splitlines()[-1]
    assert "bug" in last and "report" in last and itae.__version__ in last
    with pytest.raises(KeyError):  # --traceback: the exception itself
        cli.main(["evaluate", "nowhere.csv", "--traceback"])


def test_damaged_user_files_are_user_errors_not_bugs(tmp_path, capsys):
    from itae.data.store import EmbeddingStore

    bad = tmp_path / "assignments.csv"
    bad.write_text("path,label\na.png,cat\n", encoding="utf-8")
    assert cli.main(["evaluate", str(bad)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"itae: error: {str(bad)!r} is not an assignments file: no column cluster\n"
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(errors.StoreError, match="is not an itae embedding store manifest"):
        EmbeddingStore(store)
