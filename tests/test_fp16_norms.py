"""FP16 keeps RMSNorm's square in FP32: an LLM residual stream with a channel of magnitude ~500 (the
"massive activations" of large language models) squares past FP16's 65504, and without that rule
the row's norm overflows. Measured here on the tiny Qwen3 text-to-image model with one embedding
channel scaled up: the FP16 backbone with the square in FP16 loses the prefill's conditions, with it
in FP32 it keeps them within 1% of FP32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.export import export_stages, random_source  # noqa: E402
from bitdance_rt.precision import fp16  # noqa: E402

from conftest import torch_threads  # noqa: E402


def _prefill(path, x, cfg):
    """The prefill's conditions by onnx's reference evaluator: numpy in each tensor's declared type, as a
    strongly typed TensorRT network runs the graph. (ONNX Runtime's CPU provider would not show it: it
    computes FP16 nodes without an FP16 kernel in FP32, and its optimiser fuses the norm into an FP32
    SimplifiedLayerNormalization.)"""
    from onnx.reference import ReferenceEvaluator

    rows = x.shape[0]
    cache = {n: np.zeros(st.kv_shape(cfg, rows)[2:], dtype=np.float32) for n in st.cache_input_names(cfg)}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return ReferenceEvaluator(str(path)).run(
            ["cond"], {"x": x, "start": np.zeros(rows, dtype=np.int64), "pad": np.zeros(rows, dtype=np.int64), **cache}
        )[0]


def test_rms_norm_square_stays_fp32_under_massive_activations(tmp_path, monkeypatch):
    from t2i_tiny import write_checkpoint

    from bitdance_rt.t2i.loading import load_t2i

    model = load_t2i(write_checkpoint(tmp_path / "ckpt", parallel_num=16), 512, 512, max_text_tokens=12).model
    cfg = model.cfg
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 500.0  # one massive channel: its square is 250000 > 65504
    with torch_threads(1):
        result = export_stages(
            model, tmp_path / "e", random_source(0), stages=[st.PREFIX_EMBED, st.BACKBONE], progress=False
        )
    src = onnx.load(str(result.directory / "backbone.onnx"))
    squares = fp16.norm_squares(src.graph.node)
    assert len(squares) == 2 * cfg.n_layer + 2 * cfg.n_layer + 1  # 2 norms per layer, q/k norms, the final one
    ids = torch.randint(0, cfg.llm.vocab_size, (2, cfg.prefix_len), generator=torch.Generator().manual_seed(0))
    x = model.prefix_embed(ids).detach().numpy()
    want = _prefill(result.directory / "backbone.onnx", x, cfg)
    onnx.save(fp16.convert_fp16(onnx.load(str(result.directory / "backbone.onnx"))), str(tmp_path / "kept.onnx"))
    monkeypatch.setattr(fp16, "norm_squares", lambda nodes: [])
    onnx.save(fp16.convert_fp16(onnx.load(str(result.directory / "backbone.onnx"))), str(tmp_path / "half.onnx"))
    kept, half = _prefill(tmp_path / "kept.onnx", x, cfg), _prefill(tmp_path / "half.onnx", x, cfg)
    scale = np.abs(want).max()
    assert np.isfinite(kept).all() and np.abs(kept - want).max() <= 0.01 * scale
    assert not np.isfinite(half).all() or np.abs(half - want).max() > 0.1 * scale
