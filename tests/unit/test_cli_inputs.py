"""detect's inputs: a directory means its images; a bad --draw is a clear error before any request."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.bulk import expand_image_paths
from clients.draw import prepare_directory
from detserve.app.cli import app
from detserve.errors import ClientError


def test_a_directory_expands_to_its_images_sorted(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_image_paths([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b.png"]
    assert expand_image_paths([tmp_path / "b.png", tmp_path]) == [tmp_path / "b.png", tmp_path / "a.JPG", tmp_path / "b.png"]


def test_empty_directory_and_missing_path_are_clear(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientError, match="no image files in directory"):
        expand_image_paths([tmp_path / "empty"])
    with pytest.raises(ClientError, match="image not found"):
        expand_image_paths([tmp_path / "missing.jpg"])


def test_draw_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ClientError, match="is a file, not a directory"):
        prepare_directory(tmp_path / "file" / "drawn")
    assert prepare_directory(tmp_path / "new" / "drawn").is_dir()


def test_detect_cli_reports_them_without_a_traceback(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    result = runner.invoke(app, ["detect", str(image), "--model", "m", "--draw", str(tmp_path / "file" / "out")])
    assert result.exit_code == 1 and "is a file, not a directory" in result.output, result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["detect", str(tmp_path / "empty"), "--model", "m"])
    assert result.exit_code == 1 and "no image files in directory" in result.output, result.output
    assert "Traceback" not in result.output
