"""Llama-family model code (Llama 2/3, Mistral, Qwen2) over a paged KV cache."""
