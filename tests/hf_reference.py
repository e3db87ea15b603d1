"""transformers + PEFT as the numerical reference: greedy decoding by full recompute."""
from __future__ import annotations

import torch


class HFReference:
    def __init__(self, model_dir, adapters: dict):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            self.model.load_adapter(str(adapters[n]), adapter_name=n)
        self.model.eval()

    @torch.no_grad()
    def logprobs(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        """log_softmax of the logits at every position of ``ids`` [len, vocab]."""
        out = self.model(input_ids=torch.tensor([ids]), adapter_names=[adapter or "__base__"])
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def greedy(self, prompt: list[int], adapter: str | None, n: int) -> tuple[list[int], list[float]]:
        ids, tokens, lps = list(prompt), [], []
        for _ in range(n):
            lp = self.logprobs(ids, adapter)[-1]
            tok = int(lp.argmax())
            tokens.append(tok)
            lps.append(float(lp[tok]))
            ids.append(tok)
        return tokens, lps
