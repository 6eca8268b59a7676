from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from qwen_inference import sysinfo
from qwen_inference.cli import serve_main
from qwen_inference.settings import ServeSettings


def test_flags_and_env_vars(monkeypatch):
    monkeypatch.setenv("QWEN_MAX_QUEUE", "7")
    monkeypatch.setenv("QWEN_DTYPE", "float32")
    s = CliApp.run(ServeSettings, cli_args=["--max-concurrency", "3", "--dtype", "bfloat16", "--port", "9001"])
    assert s.max_concurrency == 3 and s.port == 9001
    assert s.max_queue == 7  # from the environment
    assert s.dtype == "bfloat16"  # the flag wins over the env var
    assert s.prefix_caching and not CliApp.run(ServeSettings, cli_args=["--no-prefix-caching"]).prefix_caching
    monkeypatch.setenv("QWEN_PREFIX_CACHING", "false")
    assert not ServeSettings().prefix_caching


def test_every_flag_has_an_env_var(monkeypatch):
    for name, field in ServeSettings.model_fields.items():
        assert field.description, f"{name} needs a description for --help"
    monkeypatch.setenv("QWEN_SERVED_MODEL_NAME", "my-model")
    assert ServeSettings().model_name == "my-model"


def test_bad_values_are_refused():
    with pytest.raises(ValidationError):
        ServeSettings(dtype="int3")
    with pytest.raises(ValidationError):
        ServeSettings(max_concurrency=0)
    with pytest.raises(ValidationError):
        ServeSettings(api_key_file=Path("/no/such/file"))


def test_cli_reports_bad_values_clearly(capsys):
    assert serve_main(["--max-concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert "max-concurrency" in err and "greater than or equal to 1" in err


def test_api_keys_from_flag_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("a\n\n# comment\n b \n")
    s = ServeSettings(api_key="z", api_key_file=f)
    assert s.api_keys() == ["z", "a", "b"]
    assert ServeSettings(api_key="").api_keys() == []


def test_threads_default_to_the_cgroup_limit(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert sysinfo.cgroup_cpu_limit(tmp_path) == min(2, sysinfo.cgroup_cpu_limit(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert sysinfo.cgroup_cpu_limit(tmp_path) == sysinfo.cgroup_cpu_limit(tmp_path / "none")
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert sysinfo.cgroup_cpu_limit(v1) == 1
    import qwen_inference.settings as settings_module

    monkeypatch.setattr(settings_module, "cgroup_cpu_limit", lambda root=None: 1)
    assert ServeSettings().effective_threads == 1
    assert ServeSettings(threads=3).effective_threads == 3


def test_memory_limit(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert sysinfo.cgroup_memory_limit(tmp_path) == 1 << 30
    (tmp_path / "memory.max").write_text("max\n")
    assert sysinfo.cgroup_memory_limit(tmp_path) is None
