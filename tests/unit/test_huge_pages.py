"""Weights on CPU live in 2 MiB pages: the platform asks torch's allocator for transparent huge pages before the
weights load, leaves an operator's own choice alone, and changes nothing where the kernel's THP mode is never."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_inference.engine import platform as platform_mod
from qwen_inference.engine.platform import TORCH_THP_ENV, Platform

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# a fresh interpreter: torch's allocator reads the variable once, at its first large allocation
PROBE = """
import sys, torch
from pathlib import Path
from qwen_inference.engine.platform import Platform
asked = Platform.cpu(torch.bfloat16).use_huge_pages() if sys.argv[1] == "platform" else False
w = torch.ones(64 << 20, dtype=torch.uint8)  # a 64 MiB weight
huge = next(int(l.split()[1]) for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
            if l.startswith("AnonHugePages"))
print(asked, huge)
"""


def probe(how: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k != TORCH_THP_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, how], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="this kernel grants no huge pages")
def test_weights_allocated_after_the_platform_asks_sit_in_huge_pages():
    asked, huge_kib = probe("platform")
    assert asked == "True" and huge_kib >= 32 << 10
    # without the platform's request the same allocation gets 4 KiB pages: the request is what makes them
    assert probe("none") == ("False", 0)


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="this kernel grants no huge pages")
def test_a_setting_already_in_the_environment_wins():
    asked, huge_kib = probe("platform", **{TORCH_THP_ENV: "0"})
    assert asked == "False" and huge_kib == 0


def test_nothing_is_asked_where_the_kernel_never_grants_them_or_off_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv(TORCH_THP_ENV, raising=False)
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(platform_mod, "THP_MODE", never)
    assert not Platform.cpu(torch.bfloat16).use_huge_pages()
    assert TORCH_THP_ENV not in os.environ
    monkeypatch.setattr(platform_mod, "THP_MODE", tmp_path / "missing")
    assert not Platform.cpu(torch.bfloat16).use_huge_pages()
    meta = Platform((torch.device("meta"),), torch.bfloat16)
    assert not meta.use_huge_pages()
    assert TORCH_THP_ENV not in os.environ
