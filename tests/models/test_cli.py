"""`storelens model ...`: one-line errors with exit 2, and the happy path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from models.cli import model_app


def test_export_info_embed(tmp_path: Path) -> None:
    """export -> info -> embed must work end to end, with the untrained warning."""
    runner = CliRunner()
    out = tmp_path / "b"
    res = runner.invoke(model_app, ["export", "--source", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "pretrained=false" in res.output
    res = runner.invoke(model_app, ["info", str(out)])
    assert res.exit_code == 0 and '"model_id"' in res.output
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((30, 40, 3), 120, np.uint8))
    res = runner.invoke(model_app, ["embed", str(out), str(img), str(img)])
    assert res.exit_code == 0 and "cos(a.png, a.png) = 1.0000" in res.output


def test_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    """A missing source, bundle or non-image must print one error line and exit 2."""
    runner = CliRunner()
    bad_img = tmp_path / "x.jpg"
    bad_img.write_bytes(b"nope")
    notes = tmp_path / "notes.txt"
    notes.write_text("the operator's file")
    cases = [
        ["export", "--source", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "o")],
        ["export", "--source", "tiny", "--out", str(tmp_path / "o"), "--precision", "int4"],
        ["export", "--source", "tiny", "--out", str(notes)],  # a file: FileExistsError's traceback before
        ["info", str(tmp_path / "nothing")],
    ]
    runner.invoke(model_app, ["export", "--source", "tiny", "--out", str(tmp_path / "b")])
    cases.append(["embed", str(tmp_path / "b"), str(bad_img)])
    for args in cases:
        res = runner.invoke(model_app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output and "error:" in res.output
    assert notes.read_text() == "the operator's file"
