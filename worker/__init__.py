"""OpenLoRA worker: model, paged KV cache, scheduler and engine (the GPU side)."""
