"""llama.cpp as a benchmark peer: convert a Qwen checkpoint to GGUF and time it with `llama-bench`.

llama.cpp is not a dependency: build it yourself once, outside the repo, and point LLAMA_CPP_DIR at the source tree
(its `convert_hf_to_gguf.py` converts Qwen v1 checkpoints; `build/bin/llama-bench` and `llama-quantize` are built
with cmake). One way, from the llama-cpp-python sdist, which vendors llama.cpp:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/src
    tar xzf /tmp/src/llama_cpp_python-*.tar.gz -C ~/.cache/llamacpp
    cd ~/.cache/llamacpp/llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-bench llama-quantize

On a CPU with AMX (Intel Sapphire/Granite Rapids), this llama.cpp's AMX matrix kernels die with SIGILL (Q8_0
prefill) or SIGSEGV (Q4_0 prefill) inside a VM; build without them by adding
`-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"` and the same `-DCMAKE_CXX_FLAGS` (decode never
uses AMX; prefill then runs on its AVX-512 kernels).

    python benchmarks/llamacpp.py --model /tmp/q18/ckpt --types f32 bf16 q8_0 q4_0 --threads 2

Note: `llama-bench -n N` generates from an empty context (decode at depth 0), whereas qwenlm's bench decodes
after its prompt; `benchmarks/versus_llamacpp.py` times both at the same depths, interleaved.

The converter asks transformers for Qwen's remote-code tokenizer (`trust_remote_code`); this script hands it
qwenlm's tokenizer instead, which has the same vocabulary, so nothing is downloaded or executed from a hub.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"


def llama_cpp_dir() -> Path:
    folder = Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR))
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"no llama.cpp source tree at {folder}; set LLAMA_CPP_DIR (see this file's docstring)")
    return folder


def _convert_in_process(model: Path, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's converter with AutoTokenizer answering with qwenlm's tokenizer (runs in a child process)."""
    import transformers

    from qwenlm.tokenizer import QwenTokenizer

    class _RemoteCodeLookalike(QwenTokenizer):
        """The attributes the converter reads from Qwen's remote-code tokenizer."""

        @property
        def mergeable_ranks(self) -> dict[bytes, int]:
            return self._mergeable_ranks

    def from_pretrained(path, *args, **kwargs):
        return _RemoteCodeLookalike(vocab_file=str(Path(path) / "qwen.tiktoken"))

    transformers.AutoTokenizer.from_pretrained = from_pretrained
    model = _with_rms_eps(model, outfile.parent / f"{outfile.stem}-src")
    source = llama_cpp_dir()
    sys.path.insert(0, str(source))
    sys.argv = ["convert_hf_to_gguf.py", str(model), "--outfile", str(outfile), "--outtype", outtype]
    import runpy

    runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")


def _with_rms_eps(model: Path, folder: Path) -> Path:
    """A view of `model` (symlinks) whose config.json also names the norm epsilon `rms_norm_eps`: this
    llama.cpp's Qwen converter writes only the LayerNorm key, which its Qwen loader then fails to find."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        link = folder / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    config = json.loads((model / "config.json").read_text())
    config.setdefault("rms_norm_eps", config.get("layer_norm_epsilon", 1e-6))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def convert(model: Path, out_dir: Path, gguf_type: str) -> Path:
    """A GGUF of `model` in `gguf_type` (f32, bf16, f16 straight from the converter; q8_0, q4_0, ... via
    llama-quantize from the f16 file). Cached: an existing file is reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outfile = out_dir / f"{model.name}-{gguf_type}.gguf"
    if outfile.exists():
        return outfile
    if gguf_type in ("f32", "bf16", "f16"):
        code = f"from benchmarks.llamacpp import _convert_in_process as c; from pathlib import Path as P; c(P({str(model)!r}), P({str(outfile)!r}), {gguf_type!r})"  # noqa: E501
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    else:
        source = convert(model, out_dir, "f16")
        quantize = llama_cpp_dir() / "build/bin/llama-quantize"
        subprocess.run([str(quantize), str(source), str(outfile), gguf_type.upper()], check=True)
    return outfile


def bench(
    gguf: Path, prompt_len: int, gen_len: int, threads: int, repeats: int = 3, depth: int = 0,
    flash_attn: bool | None = None,
) -> dict[str, float]:  # fmt: skip
    """llama-bench's prefill (pp) and decode (tg) tokens/s: its own median-free average over `repeats` runs.
    A length of 0 skips that test; `depth` tokens are in the context before either (`-d`). `flash_attn`:
    `-fa on|off` (None: llama-bench's default, auto)."""
    exe = llama_cpp_dir() / "build/bin/llama-bench"
    cmd = [str(exe), "-m", str(gguf), "-p", str(prompt_len), "-n", str(gen_len), "-d", str(depth),
           "-t", str(threads), "-r", str(repeats), "-o", "json"]  # fmt: skip
    if flash_attn is not None:
        cmd += ["-fa", "on" if flash_attn else "off"]
    runs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result = {}
    for run in runs:
        kind = "prefill_tok_s" if run["n_prompt"] > 0 else "decode_tok_s"
        result[kind] = float(run["avg_ts"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--types", nargs="+", default=["f32", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache/qwenlm/gguf")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for gguf_type in args.types:
        path = convert(args.model.resolve(), args.gguf_dir, gguf_type)
        rows.append({"type": gguf_type, **bench(path, args.prompt_len, args.gen_len, args.threads, args.repeats)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'llama.cpp':<10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for row in rows:
        print(f"{row['type']:<10} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.2f}")


if __name__ == "__main__":
    main()
