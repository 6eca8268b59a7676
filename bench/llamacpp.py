"""llama.cpp's own llama-server, built from the sources vendored in the llama-cpp-python sdist from PyPI, and
the benchmark model converted to GGUF with that tree's convert_hf_to_gguf.py. Built once and cached in
${XDG_CACHE_HOME:-~/.cache}/qwen-operator/llama.cpp/<version>/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-operator" / "llama.cpp" / VERSION


def log(msg: str) -> None:
    print(f"llama.cpp: {msg}", file=sys.stderr, flush=True)


def source_dir() -> Path:
    src = CACHE / "src"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src / "vendor" / "llama.cpp"
    CACHE.mkdir(parents=True, exist_ok=True)
    dl = CACHE / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary", ":all:",
                    "--no-deps", "-d", str(dl)], check=True, capture_output=True)
    archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
    tmp = CACHE / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    inner = next(tmp.iterdir())
    shutil.rmtree(src, ignore_errors=True)
    inner.rename(src)
    shutil.rmtree(tmp, ignore_errors=True)
    return src / "vendor" / "llama.cpp"


# ggml's instruction sets for each cap of `make bench --max-cpu-isa` (QWEN_MAX_CPU_ISA): llama.cpp built for a CPU of
# that kind instead of for this one (GGML_NATIVE)
ISA_FLAGS = {
    "avx512_vnni": ["-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=OFF"],
    "avx512": ["-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF"],
    "avx2": ["-DGGML_AVX512=OFF"],
}
COMMON_ISA = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_BMI2=ON", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX_VNNI=OFF"]


def binaries(max_isa: str | None = None) -> Path:
    """llama-server, llama-bench and llama-quantize, for this CPU or, with `max_isa`, for one with those
    instruction sets at most."""
    build = CACHE / ("build" if max_isa in (None, "avx512_bf16") else f"build-{max_isa}")
    targets = ("llama-server", "llama-bench", "llama-quantize")
    if all((build / "bin" / t).exists() for t in targets):
        return build / "bin"
    src = source_dir()
    started = time.monotonic()
    log(f"building llama-server from {src} (several minutes, once)")
    isa = ["-DGGML_NATIVE=ON"] if max_isa in (None, "avx512_bf16") else COMMON_ISA + ISA_FLAGS[max_isa]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *isa],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", *targets, "-j2"], check=True, capture_output=True)
    log(f"built in {time.monotonic() - started:.0f}s")
    return build / "bin"


CONVERT = """
import sys
sys.path.insert(0, {gguf_py!r})
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as c
# the random model's tokenizer is Qwen2's design with a vocabulary llama.cpp does not know by hash
for mod in [m for n, m in list(sys.modules.items()) if n == "convert_hf_to_gguf" or n.startswith("conversion")]:
    for cls in [v for v in vars(mod).values() if isinstance(v, type) and "get_vocab_base_pre" in vars(v)]:
        orig = vars(cls)["get_vocab_base_pre"]
        def patched(self, tokenizer, _orig=orig):
            try:
                return _orig(self, tokenizer)
            except NotImplementedError:
                return "qwen2"
        cls.get_vocab_base_pre = patched
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
c.main()
"""


def convert(model_dir: Path, outtype: str) -> Path:
    out = CACHE / "models" / f"{model_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    log(f"converting {model_dir} to {outtype}")
    tmp = out.with_suffix(".tmp")
    subprocess.run([sys.executable, "-c", CONVERT.format(gguf_py=str(src / "gguf-py"), src=str(src)), str(model_dir),
                    "--outtype", outtype, "--outfile", str(tmp)], check=True, capture_output=True)
    tmp.rename(out)
    return out


def quantize(model_dir: Path, qtype: str = "Q4_K_M", max_isa: str | None = None) -> Path:
    """The bf16 GGUF quantized by llama.cpp's own llama-quantize (Q4_K_M: the default CPU users know)."""
    out = CACHE / "models" / f"{model_dir.name}-{qtype.lower()}.gguf"
    if out.exists():
        return out
    source = convert(model_dir, "bf16")
    log(f"quantizing {source.name} to {qtype}")
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(binaries(max_isa) / "llama-quantize"), str(source), str(tmp), qtype, "2"], check=True,
                   capture_output=True)
    tmp.rename(out)
    return out
