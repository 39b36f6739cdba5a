"""Check the Qwen3 backbone and prompt ids against Hugging Face transformers (not a dependency).

Usage: python benchmarks/t2i_hf_check.py CHECKPOINT_DIR (a tiny one: tests/t2i_tiny.write_checkpoint; P=16,
512x512). Runs the official pipeline's two-call prefill (causal, then the last P positions with an
all-ones mask) and one fed-back step in transformers' Qwen3 and compares hidden states with
bitdance_rt's padded static-cache version, for the conditional and the unconditional prompt.
Measured on a tiny random checkpoint: max |diff| 2.0e-6 (prefill), 1.2e-6 (step).
"""

import sys

import torch

torch.set_num_threads(1)
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM
from bitdance_rt.t2i.loading import load_t2i
from bitdance_rt.t2i.prompt import COND_TEMPLATE, UNCOND_TEXT

d = sys.argv[1]
L = load_t2i(d, 512, 512, max_text_tokens=48)
m = L.model
hf = Qwen3ForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
tok = PreTrainedTokenizerFast(tokenizer_file=d + "/tokenizer.json")
prompt = "a red cat"
P = 16
with torch.no_grad():
    for text in (COND_TEMPLATE.format(prompt=prompt), UNCOND_TEXT):
        ids = torch.tensor(tok.encode(text))
        ours_ids = L.prompts.text_ids(text)
        assert ids.tolist() == ours_ids, (ids.tolist(), ours_ids)
        img = [
            tok.convert_tokens_to_ids(t)
            for t in ["<|vision_start|>", "<|res_32|>", "<|res_32|>"] + [f"<|query_{i}|>" for i in range(1, P)]
        ]
        seq = torch.cat([ids, torch.tensor(img)])
        emb = hf.model.embed_tokens(seq)[None]
        o = hf.model(inputs_embeds=emb[:, :-P], use_cache=True)
        pkv = o.past_key_values
        mask = torch.ones(1, 1, P, P + pkv.get_seq_length(), dtype=torch.bool)
        o2 = hf.model(inputs_embeds=emb[:, -P:], past_key_values=pkv, use_cache=True, attention_mask=mask)
        hid_hf = o2.last_hidden_state[:, -P:]
        cond = L.prompts.encode([prompt])
        rows = cond.rows(True)
        c, new = m.prefill(rows["ids"], rows["pad"])
        r = 0 if text != UNCOND_TEXT else 1
        ours = c[r : r + 1] - m.pos2d[:P]
        print("prefill hidden max diff", (ours - hid_hf).abs().max().item(), hid_hf.abs().max().item())
        # one step
        tokens = torch.sign(torch.randn(1, P, 32, generator=torch.Generator().manual_seed(1)))
        x = m.projector(tokens) + m.pos2d[:P]
        mask = torch.ones(1, 1, P, P + o2.past_key_values.get_seq_length(), dtype=torch.bool)
        o3 = hf.model(inputs_embeds=x, past_key_values=o2.past_key_values, use_cache=True, attention_mask=mask)
        kv = m.new_cache(2)
        m.write_cache(kv, new, 0)
        c2, _ = m.step(tokens.expand(2, -1, -1), 1, kv, kv_len=m.step_start(1), pad=rows["pad"])
        ours2 = c2[r : r + 1] - m.pos2d[P : 2 * P]
        print("step hidden max diff", (ours2 - o3.last_hidden_state).abs().max().item())
