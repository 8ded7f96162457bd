"""Finetuning Qwen checkpoints: full, LoRA and Q-LoRA on conversation data (`qwenlm finetune`)."""
