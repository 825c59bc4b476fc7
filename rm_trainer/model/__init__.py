"""The reward model: the backbone (backbone, moe), the head read at the last real token (reward), the
reward of an attribute head (attributes), the one batched scorer (scoring) and LoRA's training half (lora)."""
