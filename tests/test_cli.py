"""The command line: `--help` everywhere, settings precedence, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.config import AuditSettings, ConfigError, build_settings, load_config_file

runner = CliRunner()

COMMANDS = [
    ["ingest"], ["run"], ["report"], ["history"], ["compare"], ["serve"], ["demo"],
    ["calibrate"], ["phantom"], ["phantom", "generate"], ["phantom", "train"],
]


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "run", "report", "history", "compare", "serve", "demo",
                    "calibrate", "phantom"):
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "audit.toml"
    toml.write_text('[audit]\nmanifest = "m.csv"\nrandom_init = true\nig_steps = 12\n'
                    'threshold = 0.3\nmethods = ["gradcam"]\n')
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("manifest: m.csv\nrandom-init: true\nig_steps: 12\nthreshold: 0.3\n")
    for path in (toml, yaml_file):
        values = load_config_file(path)
        settings = build_settings(values, {"threshold": 0.2})
        assert settings.ig_steps == 12  # from the file
        assert settings.threshold == 0.2  # the flag wins
        assert settings.batch_size == AuditSettings.batch_size  # default kept


def test_settings_reject_unknown_names_and_ambiguous_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        build_settings({"manifest": "m.csv", "random_init": True, "stepz": 3}, {})
    with pytest.raises(ConfigError, match="exactly one"):
        build_settings({"manifest": "m.csv", "random_init": True, "weights": "x"}, {})
    with pytest.raises(ConfigError, match="unknown method"):
        build_settings({"manifest": "m.csv", "random_init": True, "methods": ["lime"]}, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "absent.toml")


def test_run_with_conflicting_model_flags_is_a_clear_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--manifest", str(tmp_path / "m.csv"), "--random-init",
                                 "--weights", "densenet121-res224-nih"])
    assert result.exit_code == 2
    assert "exactly one" in result.output


def test_run_with_the_shipped_config_parses(tmp_path: Path) -> None:
    """The config example of the README is valid."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "audit.toml"
    path.write_text(block)
    settings = build_settings(load_config_file(path), {})
    assert settings.weights == "densenet121-res224-nih"
    assert settings.acceptance[0]["metric"] == "pointing_rate"
    assert settings.acceptance[1]["op"] == "beats"


def test_run_reports_unavailable_weights_as_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.audit
    import flows.server
    from audit.model import WeightsUnavailable

    cache = tmp_path / "models_data" / "nih.pt"

    def offline(settings: AuditSettings) -> dict:
        raise WeightsUnavailable("densenet121-res224-nih", cache, "https://example.invalid/w")

    monkeypatch.setattr(flows.audit, "run_with_runner", offline)
    # no flow runs here, so no Prefect server should start ahead of one (flows/server.py)
    monkeypatch.setattr(flows.server, "start_temporary_server", flows.server.EarlyServer)
    manifest = tmp_path / "m.csv"
    manifest.write_text("")
    result = runner.invoke(app, ["run", "--manifest", str(manifest), "--weights",
                                 "densenet121-res224-nih"])
    assert result.exit_code == 2
    assert str(cache) in result.output and "--checkpoint" in result.output
    assert "Traceback" not in result.output


def test_batch_cache_key_exists_only_while_the_batch_folder_does(tmp_path: Path) -> None:
    """A deleted output folder or another --out must not reuse Prefect's cached batch path."""
    from flows.audit import _batch_cache_key

    params = {"key": "abc", "cache_dir": str(tmp_path / "out" / ".cache")}
    assert _batch_cache_key(None, params) is None
    folder = tmp_path / "out" / ".cache" / "batches" / "abc"
    folder.mkdir(parents=True)
    (folder / "boxes.parquet").write_bytes(b"x")
    key = _batch_cache_key(None, params)
    assert key is not None and key.startswith("cxr-audit-batch-abc-")
    other = {"key": "abc", "cache_dir": str(tmp_path / "elsewhere" / ".cache")}
    assert _batch_cache_key(None, other) is None
    (folder / "boxes.parquet").unlink()
    assert _batch_cache_key(None, params) is None


def test_console_script_is_entry_which_freezes_the_collector_after_the_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`cxr-audit` is `audit.cli:entry`: it registers `gc.freeze` as an exit handler before the
    command runs (so that it runs after the command's own handlers), then runs the app."""
    import atexit
    import gc

    import tomllib

    import audit.cli as cli

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert scripts["cxr-audit"] == "audit.cli:entry"
    events: list[str] = []
    monkeypatch.setattr(atexit, "register",
                        lambda fn: events.append("freeze" if fn is gc.freeze else repr(fn)))
    monkeypatch.setattr(cli, "app", lambda: events.append("app") or 0)
    with pytest.raises(SystemExit) as exit_info:
        cli.entry()
    assert exit_info.value.code == 0
    assert events == ["freeze", "app"]
