"""Prompt -> prefill token ids, as the official pipeline builds them (modeling/t2i_pipeline.py).

Conditional text: "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"; unconditional
(CFG) text: "<|im_start|>assistant\n"; both encoded with the checkpoint's tokenizer.json (the
`tokenizers` library runs the same Rust tokenizer as the official AutoTokenizer fast path). After
the text come <|vision_start|>, <|res_{H/16}|>, <|res_{W/16}|> and <|query_1|> .. <|query_{P-1}|>.
Rows are left-padded to the config's max_text_tokens (see models/t2i.py for why that is exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitDanceError
from ..t2i_config import T2IConfig

COND_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
UNCOND_TEXT = "<|im_start|>assistant\n"
PAD_ID = 0  # any valid id: padding positions are masked out


@dataclass
class PromptCondition:
    """What the loop needs of a batch of prompts: conditional rows, and the shared unconditional row."""

    ids: torch.Tensor  # [B, prefix_len] int64
    pad: torch.Tensor  # [B] int64
    uncond_ids: torch.Tensor  # [prefix_len]
    uncond_pad: int
    prompts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, s: slice) -> "PromptCondition":
        return PromptCondition(self.ids[s], self.pad[s], self.uncond_ids, self.uncond_pad, tuple(self.prompts[s]))

    def rows(self, guided: bool) -> dict[str, torch.Tensor]:
        """Prefill inputs: conditional rows, then (with CFG) one unconditional row per image."""
        if not guided:
            return {"ids": self.ids, "pad": self.pad}
        b = len(self)
        return {
            "ids": torch.cat([self.ids, self.uncond_ids.expand(b, -1)]),
            "pad": torch.cat([self.pad, torch.full((b,), self.uncond_pad, dtype=torch.int64)]),
        }


class PromptEncoder:
    def __init__(self, tokenizer_file: str | Path, cfg: T2IConfig):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BitDanceError("text-to-image needs the tokenizers package: pip install 'bitdance-rt[t2i]'") from None
        path = Path(tokenizer_file)
        if not path.is_file() and path.name == "tokenizer.json" and path.parent.exists():
            # <checkpoint>/tokenizer.json: the tokenizer of the checkpoint's layout (diffusers: tokenizer/,
            # ComfyUI: beside the text encoder), so callers may join the name to any checkpoint path
            from .layouts import tokenizer_file

            path = tokenizer_file(path.parent)
        if not path.is_file():
            raise BitDanceError(
                f"tokenizer file not found: {path} (the checkpoint directory must hold the Qwen3 tokenizer.json)"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust tokenizer raises plain Exceptions
            raise BitDanceError(f"tokenizer file {path}: not a readable tokenizer.json ({exc})") from None
        self.path = path
        self.cfg = cfg

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise BitDanceError(
                f"tokenizer {self.path} has no token {token} (a BitDance text-to-image tokenizer has "
                "<|vision_start|>, <|res_N|> and <|query_N|> tokens)"
            )
        if tid >= self.cfg.llm.vocab_size:
            raise BitDanceError(
                f"tokenizer {self.path}: {token} has id {tid}, outside the LLM vocabulary "
                f"(vocab_size {self.cfg.llm.vocab_size})"
            )
        return tid

    def image_tokens(self) -> list[int]:
        """<|vision_start|>, resolution tokens (height, then width, in latent cells) and the queries."""
        h, w = self.cfg.grid
        names = ["<|vision_start|>", f"<|res_{h}|>", f"<|res_{w}|>"]
        names += [f"<|query_{i}|>" for i in range(1, self.cfg.parallel_num)]
        return [self.token_id(n) for n in names]

    def text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        bad = [i for i in ids if i >= self.cfg.llm.vocab_size]
        if bad:
            raise BitDanceError(
                f"tokenizer {self.path} produced id(s) {bad[:5]} outside the LLM vocabulary "
                f"(vocab_size {self.cfg.llm.vocab_size}): tokenizer and config.json do not match"
            )
        return ids

    def _row(self, text: str, tail: list[int], what: str) -> tuple[list[int], int]:
        ids = self.text_ids(text)
        limit = self.cfg.max_text_tokens
        if len(ids) > limit:
            raise BitDanceError(
                f"{what} is {len(ids)} tokens with the chat template; the limit is {limit} "
                "(max_text_tokens): shorten it or export with a larger --max-text-tokens"
            )
        pad = limit - len(ids)
        return [PAD_ID] * pad + ids + tail, pad

    def encode(self, prompts) -> PromptCondition:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise BitDanceError("no prompt given: pass at least one --prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise BitDanceError(f"prompt {i} is empty: give a text description of the image")
        tail = self.image_tokens()
        rows = [self._row(COND_TEMPLATE.format(prompt=p), tail, f"prompt {i}") for i, p in enumerate(prompts)]
        uncond, uncond_pad = self._row(UNCOND_TEXT, tail, "the unconditional prompt")
        return PromptCondition(
            ids=torch.tensor([r[0] for r in rows], dtype=torch.int64),
            pad=torch.tensor([r[1] for r in rows], dtype=torch.int64),
            uncond_ids=torch.tensor(uncond, dtype=torch.int64),
            uncond_pad=uncond_pad,
            prompts=tuple(prompts),
        )
