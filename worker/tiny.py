"""A tiny random Llama, an offline-trained tokenizer and random PEFT adapters, written to a directory.

For tests and the demo: nothing is downloaded. Weights are scaled so that
the random model has confident (well separated) next-token distributions and
the adapters visibly change its output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# (rank, alpha, target modules, rslora): varied ranks and targets, as real fleets have
ADAPTER_SHAPES = [
    (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    (4, 8, ["q_proj", "v_proj"], False),
    (16, 16, ["o_proj", "down_proj", "gate_proj"], False),
    (32, 32, ["k_proj", "up_proj"], True),
    (2, 4, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    (12, 24, ["gate_proj", "up_proj", "down_proj"], False),
]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings; "
         "adapters serve many tenants from one base model, and every token streams back in order. "
         "SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name; def main(): return 42 "
         "Bonjour, ça va? Ünïcödé 日本語 テスト ✓ 0123456789 + - * / = < > ( ) [ ] { } ' \" ! ? . , : ;")


@dataclass
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 160
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 384
    max_position_embeddings: int = 1024
    model_type: str = "llama"
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None     # e.g. Llama 3.1's {"rope_type": "llama3", ...}


def train_tokenizer(out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [WORDS[i:] + WORDS[:i] for i in range(0, len(WORDS), 7)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(out_dir: str | Path, spec: TinySpec | None = None, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer to ``out_dir``."""
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out, spec.vocab_size)
    vocab = len(tokenizer)
    head_dim = spec.hidden_size // spec.num_heads
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[spec.model_type]],
        "model_type": spec.model_type, "vocab_size": vocab, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": head_dim,
        "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": spec.tie_word_embeddings, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "torch_dtype": "float32", "attention_bias": False,
    }
    if spec.rope_scaling:
        config["rope_scaling"] = {**spec.rope_scaling, "rope_theta": config["rope_theta"]}
    if spec.model_type == "mistral":
        config["sliding_window"] = spec.max_position_embeddings
    g = torch.Generator().manual_seed(seed)
    h, inter, q, kv = spec.hidden_size, spec.intermediate_size, spec.num_heads * head_dim, spec.num_kv_heads * head_dim

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    t = {"model.embed_tokens.weight": rnd(vocab, h, std=1.0), "model.norm.weight": 1 + rnd(h, std=0.1)}
    if not spec.tie_word_embeddings:
        t["lm_head.weight"] = rnd(vocab, h, std=3.0 / h ** 0.5)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        for name, (fan_out, fan_in) in {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                                        "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
                                        "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                                        "mlp.down_proj": (h, inter)}.items():
            t[p + name + ".weight"] = rnd(fan_out, fan_in, std=1.0 / fan_in ** 0.5)
            if spec.model_type == "qwen2" and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                t[p + name + ".bias"] = rnd(fan_out, std=0.1)
        t[p + "input_layernorm.weight"] = 1 + rnd(h, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(h, std=0.1)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
    return out


def make_adapter(model_dir: str | Path, out_dir: str | Path, rank: int, alpha: float, targets: list[str],
                 rslora: bool = False, seed: int = 0, layers: list[int] | None = None) -> Path:
    """A random PEFT LoRA adapter for the model in ``model_dir`` (real PEFT file format)."""
    from peft import LoraConfig

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
               base_model_name_or_path=str(model_dir)).save_pretrained(str(out))
    g = torch.Generator().manual_seed(seed)
    scaling = alpha / (rank ** 0.5 if rslora else rank)
    tensors = {}
    for i in layers if layers is not None else range(cfg["num_hidden_layers"]):
        for m in targets:
            fan_in, fan_out = shapes[m]
            group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{m}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5).contiguous()
            # sized so that the adapter's delta is about a third of the base projection's output
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g)
                                               * (0.6 / (rank ** 0.5 * scaling))).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def make_tiny_setup(out_dir: str | Path, num_adapters: int = 4, spec: TinySpec | None = None,
                    seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """The model under ``out_dir/model`` and adapters ``ad0..`` under ``out_dir/adapters``."""
    root = Path(out_dir)
    model = make_tiny_model(root / "model", spec, seed)
    adapters = {}
    for k in range(num_adapters):
        rank, alpha, targets, rslora = ADAPTER_SHAPES[k % len(ADAPTER_SHAPES)]
        adapters[f"ad{k}"] = make_adapter(model, root / "adapters" / f"ad{k}", rank, alpha, targets, rslora,
                                          seed=seed * 1000 + k + 1)
    return model, adapters
