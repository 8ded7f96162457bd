"""Run by tests/integrations/test_vllm_plugin.py with the vLLM venv's python (vLLM is not importable in the
test interpreter): greedy generations from `vllm.LLM` over the plugin, written as JSON for the test to
compare with qwenlm's own engine.

python vllm_offline.py SAFETENSORS_CKPT BIN_CKPT OUT.json   (env: HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1)
python vllm_offline.py --gptq GPTQ_CKPT OUT.json

With --gptq it exits with GPTQ_UNAVAILABLE where this CPU build of vLLM has no GPTQ kernel: vLLM's CPU GPTQ
method (`cpu_gemm_wna16`) is in its AVX-512 library only, and an AVX2-only CPU loads the other one.
"""

import json
import os
import sys

from vllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def logprobs(llm: LLM, prompts: list[list[int]]) -> list[list[float]]:
    """Each greedy token's logprob (what shows LogN acting even where it does not flip a token)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)] for o in outs]


GPTQ_UNAVAILABLE = 3


def main() -> None:
    if sys.argv[1] == "--gptq":
        return gptq(*sys.argv[2:4])
    safetensors_ckpt, bin_ckpt, out_file = sys.argv[1:4]
    spec = json.loads(sys.stdin.read())
    results = {}
    # 1. Exactly what a user types: vllm.LLM(PATH), no trust_remote_code, no chat template; NTK alpha 1.
    llm = LLM(safetensors_ckpt, dtype="float32", enforce_eager=True, max_model_len=spec["max_model_len"])
    results["alpha1"] = greedy(llm, spec["prompts"])
    results["alpha1_logprobs"] = logprobs(llm, spec["prompts"])
    text = llm.generate(spec["text"], GREEDY, use_tqdm=False)[0]
    results["text_prompt_ids"] = list(text.prompt_token_ids)
    results["text_output"] = [list(text.outputs[0].token_ids), text.outputs[0].text]
    chat = llm.chat(spec["messages"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    results["chat_prompt_ids"] = list(chat.prompt_token_ids)
    results["chat_output"] = [list(chat.outputs[0].token_ids), chat.outputs[0].text, chat.outputs[0].finish_reason]
    del llm
    # 2. The long-context engine for prompts of seq_length+1 .. 2*seq_length tokens: NTK alpha 3, from a
    #    pytorch_model.bin checkpoint, split over two tensor-parallel workers.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # CPU build: 2 workers on one NUMA node
    llm = LLM(
        bin_ckpt,
        dtype="float32",
        enforce_eager=True,
        max_model_len=spec["max_model_len"],
        hf_overrides={"qwenlm_ntk_alpha": 3},
        tensor_parallel_size=2,
    )
    results["alpha3_tp2_bin"] = greedy(llm, spec["prompts"])
    del llm
    with open(out_file, "w") as f:
        json.dump(results, f)


def gptq(gptq_ckpt: str, out_file: str) -> None:
    """A GPTQ int4 checkpoint (qwenlm quantize's AutoGPTQ layout) through vLLM's GPTQ method (bf16 activations)."""
    import torch
    from vllm.platforms import current_platform

    spec = json.loads(sys.stdin.read())
    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        print("vLLM's CPU build has no GPTQ kernel on this CPU (cpu_gemm_wna16: AVX-512 only)")
        sys.exit(GPTQ_UNAVAILABLE)
    llm = LLM(gptq_ckpt, dtype="bfloat16", enforce_eager=True, max_model_len=spec["seq_length"])
    with open(out_file, "w") as f:
        json.dump([greedy(llm, spec["prompts"]), logprobs(llm, spec["prompts"])], f)


if __name__ == "__main__":  # vLLM spawns its engine processes: they must not run this again
    main()
