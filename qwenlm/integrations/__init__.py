"""Bridges from qwenlm to other engines. Each sub-package imports its engine only when it is used:
`import qwenlm` never pulls any of them in.

- `qwenlm.integrations.vllm`: Qwen v1 on vLLM (tensor/pipeline/data parallel, Ray multi-node), with
  Qwen's dynamic NTK and LogN kept exact; also `qwenlm serve --backend vllm`.
"""
