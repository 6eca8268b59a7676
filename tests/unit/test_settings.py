from __future__ import annotations

import os
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


def test_max_cpu_isa_hides_the_flags_above_it(monkeypatch):
    """QWEN_MAX_CPU_ISA holds the engine to an older CPU's instruction sets: the flags above the cap are gone from
    what the engine reads, each cap names oneDNN's, and a name that is no cap is refused, by qwen-serve at start."""
    before = os.environ.pop(sysinfo.MAX_CPU_ISA_ENV, None)  # the CPU's own flags, whatever cap the tests run under
    sysinfo.cpu_flags.cache_clear()
    real = sysinfo.cpu_flags()
    try:
        for cap, gone in (("avx512_vnni", {"avx512_bf16", "amx_bf16"}),
                          ("avx512", {"avx512_bf16", "avx512_vnni", "amx_int8"}),
                          ("avx2", {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})):
            monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, cap.upper())
            sysinfo.cpu_flags.cache_clear()
            assert sysinfo.max_cpu_isa() == cap and sysinfo.ONEDNN_ISAS[cap]
            assert not sysinfo.cpu_flags() & gone
            assert sysinfo.cpu_flags() == real - {f for f in real if f in gone or (cap == "avx2" and
                                                                                  f.startswith(("avx512", "amx")))}
            assert not sysinfo.cpu_has_fast_bf16()
        monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "avx512_bf16")
        sysinfo.cpu_flags.cache_clear()
        assert sysinfo.cpu_flags() == real - {"amx_bf16", "amx_int8", "amx_tile", "amx_fp16"}
        ServeSettings()  # a known cap is a known variable
        monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "avx513")
        with pytest.raises(ValueError, match="names no instruction set; one of avx512_bf16, avx512_vnni"):
            sysinfo.max_cpu_isa()
        with pytest.raises(ValidationError, match="QWEN_MAX_CPU_ISA='avx513' names no instruction set"):
            ServeSettings()
        monkeypatch.setenv(sysinfo.MAX_CPU_ISA_ENV, "")
        assert sysinfo.max_cpu_isa() is None
    finally:
        monkeypatch.delenv(sysinfo.MAX_CPU_ISA_ENV, raising=False)
        sysinfo.cpu_flags.cache_clear()
    assert sysinfo.cpu_flags() == real
    if before is not None:
        os.environ[sysinfo.MAX_CPU_ISA_ENV] = before
        sysinfo.cpu_flags.cache_clear()


def test_rope_scaling_from_flag_and_env(monkeypatch):
    yarn = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
    s = CliApp.run(ServeSettings, cli_args=["--rope-scaling", yarn])
    assert s.rope_scaling.parameters() == {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32768}
    monkeypatch.setenv("QWEN_ROPE_SCALING", '{"rope_type": "linear", "factor": 2}')
    assert ServeSettings().rope_scaling.parameters() == {"rope_type": "linear", "factor": 2.0}
    assert ServeSettings(rope_scaling=None).rope_scaling is None


@pytest.mark.parametrize("scaling, says", [
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}, "beta_fast"),  # a key it does not take: refused
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type"),  # its frequencies would depend on the batch
    ({"rope_type": "yarn", "factor": 1.0}, "greater than 1"),
    ({"rope_type": "yarn"}, "factor"),
    ({"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 4096}, "yarn only"),
])
def test_rope_scalings_it_does_not_take_are_refused(scaling, says, capsys):
    import json

    with pytest.raises(ValidationError, match=says):
        ServeSettings(rope_scaling=scaling)
    assert serve_main(["--rope-scaling", json.dumps(scaling)]) == 2
    assert "rope-scaling" in capsys.readouterr().err
