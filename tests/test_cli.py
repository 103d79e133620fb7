import json

from typer.testing import CliRunner

from partdistill.cli import app
from tests.conftest import DEMO_CONFIG

runner = CliRunner(env={"COLUMNS": "200"})


def _tiny(store):
    return ["--store", str(store), "-o", "data.partsworld.images=8", "-o", "data.partsworld.width=96",
            "-o", "data.partsworld.height=64"]


def test_run_status_verify(tmp_path, unbuilt_teacher):
    store = tmp_path / "store"
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), "--until", "data", "--engine", "local", *_tiny(store)])
    assert result.exit_code == 0, result.output
    assert "computed" in result.output

    result = runner.invoke(app, ["status", str(DEMO_CONFIG), *_tiny(store)])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "complete" in lines["data"] and "KiB" in lines["data"]
    assert "not built yet" in lines["teacher"]

    result = runner.invoke(app, ["verify", "--store", str(store)])
    assert result.exit_code == 0 and "1 artifact(s)" in result.output
    [version] = [p for p in (store / "data").iterdir() if not p.name.startswith(".")]
    victim = next(version.glob("images/*.png"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", "--store", str(store)])
    assert result.exit_code == 4 and "changed" in result.output and victim.name in result.output


def test_unbuilt_stage_exit_code_and_message(tmp_path, unbuilt_teacher):
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), "--until", "teacher", "--engine", "local",
                                 *_tiny(tmp_path / "s")])
    assert result.exit_code == 3
    assert "stage 'teacher' is not built yet" in " ".join(result.output.split())


def test_config_error_exit_code_names_key(tmp_path):
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), "-o", "mining.kk=5", "--engine", "local"])
    assert result.exit_code == 2
    assert "mining.kk" in result.output and "did you mean 'mining.k'" in result.output
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), "--until", "minning", "--engine", "local"])
    assert result.exit_code == 2 and "no such stage" in result.output


def test_partsworld_command(tmp_path):
    out = tmp_path / "pw"
    result = runner.invoke(app, ["partsworld", "--out", str(out), "--images", "6", "--width", "96",
                                 "--height", "64", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 6
    assert (out / "preview.png").is_file()
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["val"]) == 6


def test_bad_input_error_is_named_without_traceback(tmp_path):
    """A missing teacher checkpoint: exit 1, the error class and the file, no traceback."""
    missing = tmp_path / "nowhere" / "teacher.pth"
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), "--until", "teacher", "--engine", "local",
                                 *_tiny(tmp_path / "s"), "-o", "teacher.source='checkpoint'",
                                 "-o", f"teacher.checkpoint='{missing}'"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "CheckpointError" in text and "teacher.pth" in text and "Traceback" not in text
    assert "complete" in text  # the status table: data was kept


def test_a_run_is_quiet_and_library_chatter_goes_to_the_stage_log(tmp_path):
    """stdout holds the results only and stderr the progress: pycocotools' prints, mmengine's
    logger and torch's UserWarnings go to store/<stage>/.logs/<version>.log."""
    import subprocess
    import sys

    store = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, "-m", "partdistill.cli", "run", str(DEMO_CONFIG), "--until", "teacher", "--engine", "local",
         *_tiny(store), "-o", "teacher.source=train", "-o", "teacher.train.max_iters=2",
         "-o", "teacher.train.batch_size=2",
         "-o", "teacher.train.image_size=[64,96]"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    for chatter in ("UserWarning", "loading annotations", "creating index", "index created", "last_checkpoint"):
        assert chatter not in done.stdout and chatter not in done.stderr, chatter
    assert done.stdout == ""  # no evaluate stage ran: no table
    [log] = (store / "teacher" / ".logs").glob("*.log")
    assert "loading annotations into memory" in log.read_text()
