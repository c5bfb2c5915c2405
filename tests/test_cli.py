"""The `lepton` command, driven as a user would, on tiny data."""

from __future__ import annotations

from typer.testing import CliRunner

from lepton_automl.cli import app

runner = CliRunner()


def test_registry_and_plugins_listing() -> None:
    result = runner.invoke(app, ["registry", "list", "efficientnet*", "--pretrained"])
    assert result.exit_code == 0, result.output
    assert "efficientnet_lite0" in result.output and "resnet18" not in result.output
    result = runner.invoke(app, ["plugins", "list"])
    assert result.exit_code == 0 and "image" in result.output and "text" in result.output


def test_search_export_and_predict(image_folder, tmp_path) -> None:
    run_dir = tmp_path / "runs"
    result = runner.invoke(app, ["search", "--data", str(image_folder), "--backbone", "efficientnet_lite0",
                                 "--n-trials", "2", "--run-dir", str(run_dir), "--pick", "accuracy"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "Recommended: trial" in result.output
    best = run_dir / "image-shapes" / "best"
    assert (best / "model.onnx").is_file() and (best / "README.md").is_file()
    assert (run_dir / "image-shapes" / "report.html").is_file()

    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--study", "image-shapes", "--pick", "latency", "--out", str(out),
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "lowest latency" in result.output
    image = next((image_folder / "disc").glob("*.png"))
    result = runner.invoke(app, ["predict", str(out), str(image)])
    assert result.exit_code == 0, result.output
    assert str(image) in result.output
    assert result.output.strip().split("\t")[-1] in {"disc", "horizontal", "vertical"}
    # an earlier export is replaced; a folder that is not one is never deleted
    again = runner.invoke(app, ["export", "--study", "image-shapes", "--out", str(out), "--run-dir", str(run_dir)])
    assert again.exit_code == 0, again.output
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    refused = runner.invoke(app, ["export", "--study", "image-shapes", "--out", str(precious), "--run-dir", str(run_dir)])
    assert refused.exit_code != 0 and "not a Lepton export" in refused.output
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_errors_are_one_line_with_the_fix(image_folder, tmp_path) -> None:
    result = runner.invoke(app, ["search", "--data", str(tmp_path / "nope.csv"), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["search", "--backbone", "efficientnet_lite9", "--run-dir", str(tmp_path),
                                 "--data", str(image_folder)])
    assert result.exit_code == 2
    assert "efficientnet_lite9" in result.output and "Did you mean" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["predict", str(tmp_path), "x.png"])
    assert result.exit_code == 2 and "not a Lepton export" in result.output


def test_data_check_reports_fixes_and_errors(image_folder, tmp_path) -> None:
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(image_folder, root)
    shutil.copy(root / "disc" / "000.png", root / "disc" / "dup.png")
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0, result.output
    assert "dropped 1 exact duplicates" in result.output and "36 usable examples" in result.output
    result = runner.invoke(app, ["data", "check", str(root), "--strict"])
    assert result.exit_code == 2 and "strict mode" in result.output
