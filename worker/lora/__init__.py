"""LoRA adapters: PEFT-format loading and validation, GPU slots, compute backends."""
