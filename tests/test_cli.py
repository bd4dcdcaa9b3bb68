"""The ``streamstars`` command line as a whole: a broken subcommand says why."""

from __future__ import annotations

import sys

import pytest

from streamstars.cli import build_parser, main


def test_a_subcommand_whose_module_cannot_be_imported_says_why(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # None in sys.modules makes ``import streamstars.consumers.cli`` raise ImportError
    monkeypatch.setitem(sys.modules, "streamstars.consumers.cli", None)
    help_text = " ".join(build_parser().format_help().split())
    assert "run (unavailable: importing streamstars.consumers.cli failed" in help_text
    assert main(["run", "--bootstrap-servers", "127.0.0.1:9092", "--topic", "t"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("streamstars: error: the run command is unavailable: importing "
                            "streamstars.consumers.cli failed (ModuleNotFoundError")
    assert "reinstall" in error and "pip install" not in error
    # the other commands still work
    assert main(["config", "show"]) == 0


def test_every_plugged_subcommand_is_there() -> None:
    help_text = build_parser().format_help()
    for name in ("refresh-refs", "run", "publish"):
        assert name in help_text
    assert "unavailable" not in help_text
