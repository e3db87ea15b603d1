"""What the API knows of the base model's tokenizer, when it is given the model dir: token
counts (to refuse over-long prompts before they are queued), token strings (for logprobs) and
the chat template. Without a model dir the workers check lengths and logprobs name token ids."""
from __future__ import annotations

import json
from pathlib import Path

from producer.api.openai_schema import Message


class BaseModelInfo:
    def __init__(self, model_dir: str | None):
        self.tokenizer, self.template, self.max_context = None, None, None
        self.max_token_chars: int | None = None
        self.vocab_size: int | None = None
        self.bos, self.eos = "", ""
        if model_dir is None:
            return
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
            # no token spans more characters than its vocabulary entry (x2 for normalizers)
            self.max_token_chars = 2 * max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)))
        cfg = _read_json(d / "tokenizer_config.json")
        self.template = cfg.get("chat_template")
        self.bos, self.eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        model_cfg = _read_json(d / "config.json")
        self.max_context = model_cfg.get("max_position_embeddings")
        self.vocab_size = model_cfg.get("vocab_size")

    def surely_too_long(self, prompt: str) -> bool:
        """Over the context by its length alone: encoding megabytes of text would block the API for
        seconds and take gigabytes, to learn what the length already tells."""
        return (self.max_context is not None and self.max_token_chars is not None
                and len(prompt) > self.max_context * self.max_token_chars)

    def count(self, prompt: str | list[int]) -> int | None:
        if isinstance(prompt, list):
            return len(prompt)
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(prompt).ids)

    def piece(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[Message]) -> str:
        """The model's chat template when its tokenizer has one; else one ``role: content`` line per
        message and an open ``assistant:`` line for the reply."""
        if self.template:
            import jinja2
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
            env.globals["raise_exception"] = _raise
            msgs = [{"role": m.role, "content": m.text} for m in messages]
            return env.from_string(self.template).render(messages=msgs, add_generation_prompt=True,
                                                         bos_token=self.bos, eos_token=self.eos)
        return "".join(f"{m.role}: {m.text}\n" for m in messages) + "assistant:"


def _raise(message):
    raise ValueError(message)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _token_text(tok) -> str:
    if isinstance(tok, dict):
        return tok.get("content", "")
    return tok or ""
