"""The `modtag` command line with broken, hostile and missing arguments and settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ModelError
from core.settings import Settings, get_settings
from modtag.cli import main
from modtag.preflight import check_models_reachable
from modtag.servers import free_port
from modtag.stack import settings_environment
from policies import builtin_dir
from tests.support.photos import photo_bytes


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MODTAG_MODELS", "MODTAG_DATA_DIR", "MODTAG_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--workers", "0"],
        ["up", "--workers", "many"],
        ["up", "--port", "70000"],
        ["scan", "--timeout", "-1", "x"],
        ["scan"],
        ["frobnicate"],
        [],
        ["policy", "validate"],
    ],
)
def test_bad_arguments_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: modtag" in capsys.readouterr().err


def test_scan_of_a_missing_path_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "--api", "http://127.0.0.1:9", "/no/such/dir"]) == 2
    assert "/no/such/dir: no such file or directory" in capsys.readouterr().err


def test_scan_of_a_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    assert main(["scan", "--api", "http://127.0.0.1:9", str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MODTAG_MAX_UPLOAD_BYTES", "lots", "MODTAG_MAX_UPLOAD_BYTES"),
        ("MODTAG_MAX_UPLOAD_BYTES", "-5", "MODTAG_MAX_UPLOAD_BYTES"),
        ("MODTAG_DTYPE", "float8", "MODTAG_DTYPE"),
        ("MODTAG_API_PORT", "99999", "MODTAG_API_PORT"),
        ("MODTAG_LEASE_RENEW_S", "40", "lease_renew_s must be at most half of running_lease_s"),
        ("MODTAG_BLOB_URL", "ftp://host/x", "MODTAG_BLOB_URL"),
        ("MODTAG_MODELS", "   ", "MODTAG_MODELS"),
    ],
)
def test_bad_settings_stop_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["scan", "--api", "http://127.0.0.1:9", "."]) == 2
    err = capsys.readouterr().err
    assert named in err and "settings_invalid" in err


def test_policy_validate_prints_versions_and_locates_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", str(builtin_dir() / "moderation.yaml")]) == 0
    assert "ok: policy 'moderation' version" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: broken\ndescription: x\ncategories:\n  - name: a\n    description: a\n    combine: max\n"
        "    review: 2.5\n    block: 0.9\n    checks:\n      - kind: probe\n        question: is it?\n"
    )
    assert main(["policy", "validate", str(bad), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7:" in err
    assert "missing.yaml" in err


def test_hub_models_offline_fail_fast_with_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No weights cached and no hub: the message names the way out (download, a directory, tiny-random)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as error:
        check_models_reachable("base")
    assert error.value.code == "model_unavailable"
    assert "Salesforce/blip-vqa-base" in error.value.message and "tiny-random" in error.value.message
    check_models_reachable("tiny-random")  # built locally: nothing to reach


@pytest.mark.slow
def test_scan_with_unreachable_models_fails_before_starting_anything(tmp_path: Path) -> None:
    """The preflight refuses before any server or worker starts (so it fails in seconds, not after a model load).

    Checked by what exists afterwards, not by a stopwatch: no database, no blobs, no Redis in the data dir.
    """
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "MODTAG_MODELS": "base", "MODTAG_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    examples = Path(__file__).resolve().parents[2] / "examples"
    done = subprocess.run(
        [sys.executable, "-m", "modtag", "scan", str(examples)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 3, done.stderr
    assert "[model_unavailable]" in done.stderr and "MODTAG_MODELS=tiny-random" in done.stderr
    data = tmp_path / "data"
    assert not data.exists() or not any(data.iterdir()), sorted(p.name for p in data.iterdir())


@pytest.mark.slow
def test_policy_test_with_unreachable_models_fails_like_scan(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "MODTAG_MODELS": "base", "MODTAG_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    (tmp_path / "cases" / "allow").mkdir(parents=True)
    (tmp_path / "cases" / "allow" / "a.jpg").write_bytes(photo_bytes("coffee"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modtag",
            "policy",
            "test",
            str(builtin_dir() / "moderation.yaml"),
            str(tmp_path / "cases"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert (
        "[model_unavailable]" in done.stderr and "hf download" in done.stderr and "huggingface-cli" not in done.stderr
    )
    # Refused by the preflight, as `scan` is, before any model load: HF_HUB_OFFLINE makes the loader fail fast here,
    # but without it (an offline machine that does not say so) the loader spends minutes in the hub's retries.
    assert "the hub cannot be reached from this machine" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["scan", "--no-progress"],
        ["listing", "check", "--title", "A mug"],
    ],
)
def test_an_unreachable_api_is_one_line_and_exit_3(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "rocket.jpg"
    photo.write_bytes(photo_bytes("rocket", size=(32, 32)))
    url = f"http://127.0.0.1:{free_port()}"
    assert main([*command, "--api", url, str(photo)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"modtag: cannot reach the modtag API at {url}") and "[api_unreachable]" in err


def test_flags_reach_the_settings_and_leave_the_environment_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Settings] = []

    def scan_handler(_: object, settings: Settings) -> int:  # stands in for the scan: only its settings matter
        seen.append(settings)
        return 0

    monkeypatch.setattr("modtag.cli.cmd_scan", scan_handler)
    main(["scan", "--api", "http://127.0.0.1:9", "--models", "tiny-random", "--data-dir", str(tmp_path), "."])
    [settings] = seen
    assert settings.models == "tiny-random" and settings.data_dir == tmp_path
    assert "MODTAG_MODELS" not in os.environ and "MODTAG_DATA_DIR" not in os.environ


def test_a_child_stack_gets_exactly_the_settings_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODTAG_MODELS", "base")
    monkeypatch.setenv("MODTAG_WORKER_CONCURRENCY", "5")
    monkeypatch.setenv("MODTAG_LOG_LEVEL", "DEBUG")  # not a setting: passed through as it is
    before = dict(os.environ)
    settings = Settings(_env_file=None, models="tiny-random", worker_concurrency=None, admin_key="k" * 40)
    env = settings_environment(settings)
    assert env["MODTAG_MODELS"] == "tiny-random" and "MODTAG_WORKER_CONCURRENCY" not in env
    assert env["MODTAG_ADMIN_KEY"] == "k" * 40 and env["MODTAG_AUTH"] == "true"
    assert env["MODTAG_LOG_LEVEL"] == "DEBUG" and env["PATH"] == os.environ["PATH"]
    assert dict(os.environ) == before
    with monkeypatch.context() as child_env:  # the child reads its settings back from that environment
        for name in [name for name in os.environ if name.startswith("MODTAG_")]:
            child_env.delenv(name)
        for name, value in env.items():
            child_env.setenv(name, value)
        assert Settings(_env_file=None) == settings


def test_bench_banks_prints_its_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--banks", "5e3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bank_size"] == 5000 and report["correct"] == report["queries"]


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from core import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"modtag {__version__}"


def test_a_missing_worker_extra_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # torch is installed here: the child makes it unimportable, as in an install without the [worker] extra.
    code = "import sys; sys.modules['torch'] = None; from modtag.cli import main; sys.exit(main(['worker']))"
    env = {**os.environ, "MODTAG_DATA_DIR": str(tmp_path), "MODTAG_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install 'modtag[worker]'" in done.stderr and "[missing_extra]" in done.stderr


def test_a_taken_worker_metrics_port_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "MODTAG_DATA_DIR": str(tmp_path),
            "MODTAG_API_HOST": "127.0.0.1",
            "MODTAG_WORKER_METRICS_PORT": str(port),
            "MODTAG_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        }
        done = subprocess.run(
            [sys.executable, "-m", "modtag", "worker"], capture_output=True, text=True, env=env, timeout=120
        )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert f"127.0.0.1:{port} is unavailable" in done.stderr and "[metrics_port_taken]" in done.stderr


def test_keys_use_one_private_database_per_user_whatever_the_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODTAG_DATA_DIR"} | {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    outputs = []
    for cwd in (tmp_path / "one", tmp_path / "two"):
        cwd.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "modtag", "keys", "list"],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stderr)
    data_dir = tmp_path / "xdg" / "modtag"
    assert outputs[0] == outputs[1] and f"database: sqlite:///{data_dir / 'modtag.db'}" in outputs[0]
    assert not (tmp_path / "one" / ".modtag").exists()
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (data_dir / "modtag.db").stat().st_mode & 0o777 == 0o600


def test_the_admin_key_comes_from_a_file_never_from_argv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr("modtag.cli.cmd_up", lambda _, settings: seen.append(settings) or 0)
    key = "k" * 40
    (tmp_path / "admin.key").write_text(key + "\n")
    assert main(["up", "--admin-key-file", str(tmp_path / "admin.key"), "--data-dir", str(tmp_path)]) == 0
    assert seen[0].admin_key is not None and seen[0].admin_key.get_secret_value() == key
    with pytest.raises(SystemExit) as refused:
        main(["up", "--admin-key", key])
    assert refused.value.code == 2
    assert main(["up", "--admin-key-file", str(tmp_path / "missing.key")]) == 2
    assert "cannot read --admin-key-file" in capsys.readouterr().err


def test_keys_take_the_data_dir_of_modtag_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "stack"
    assert main(["keys", "--data-dir", str(data_dir), "create", "--role", "review", "--tenant", "default"]) == 0
    assert f"database: sqlite:///{data_dir / 'modtag.db'}" in capsys.readouterr().err
    assert main(["keys", "list", "--data-dir", str(data_dir), "--json"]) == 0  # after the action's name too
    listed = capsys.readouterr()
    assert [key["role"] for key in json.loads(listed.out)] == ["review"] and str(data_dir) in listed.err


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["migrate"],
        ["reconcile"],
        ["api", "--port", "0"],
        ["worker"],
        ["policy", "replay", str(builtin_dir() / "moderation.yaml"), "--since", "1h"],
        ["up", "--port", "0"],
    ],
)
def test_an_unreachable_database_is_one_line_and_exit_3(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("MODTAG_DATABASE_URL", f"postgresql+psycopg://modtag:hunter2@127.0.0.1:{port}/modtag")
    assert main(command) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"modtag: cannot reach the database at postgresql+psycopg://modtag:***@127.0.0.1:{port}")
    assert err.rstrip().endswith("[database_unavailable]") and "hunter2" not in err


def test_deploy_env_is_never_committed() -> None:
    root = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=root, check=False)
    assert ignored.returncode == 0, "deploy/.env (the compose file's secrets) must be git-ignored"
