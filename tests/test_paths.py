"""bitdance_rt.paths: the same cache directories as before it became their one home."""

import hashlib
import json
from pathlib import Path

from bitdance_rt import paths
from bitdance_rt.config import load_config


def _old_model_dir(cfg, source, steps):  # the formula of the automatic export's directory, written out
    ident = json.dumps([cfg.to_json_dict()["constructor_args"], source], sort_keys=True)
    return f"{cfg.name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}-s{steps}"


def test_cache_root_and_roots(monkeypatch, tmp_path):
    monkeypatch.delenv("BITDANCE_RT_CACHE", raising=False)
    assert paths.cache_root() == Path.home() / ".cache" / "bitdance-rt"
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path))
    assert paths.cache_root() == tmp_path
    assert paths.exports_root() == tmp_path / "exports"
    assert paths.calibration_root() == tmp_path / "calibration"
    assert paths.engines_root() == tmp_path / "engines"
    assert paths.hash_cache_file() == tmp_path / "file-hashes.json"
    assert paths.ort_optimized_root().parent == tmp_path


def test_callers_use_it(monkeypatch, tmp_path):
    from bitdance_rt import fileio
    from bitdance_rt.engines import cache as ec
    from bitdance_rt.paths import cache_root
    from bitdance_rt.paths import export_dir as export_dir_for
    from bitdance_rt.precision.auto import default_calibration_dir, variant_dir

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path))
    cfg = load_config("tiny-4x")
    old = _old_model_dir(cfg, "weights.safetensors", 4)
    assert cache_root() == tmp_path and ec.engine_root() == tmp_path / "engines"
    assert export_dir_for(cfg, "weights.safetensors", 4) == tmp_path / "exports" / old
    assert default_calibration_dir(cfg, "weights.safetensors", 4) == tmp_path / "calibration" / old
    if hasattr(fileio, "cache_root"):  # the hash cache's root (fileio) must be the same directory
        assert fileio.cache_root() == paths.cache_root()

    fp32 = tmp_path / "exports" / old

    class Cal:
        key = {"format": "x", "labels": [0, 1]}

    assert variant_dir(fp32, "fp16") == fp32.with_name(f"{old}-fp16")
    digest = hashlib.sha256(json.dumps([Cal.key, ["/a"]], sort_keys=True).encode()).hexdigest()[:8]
    assert variant_dir(fp32, "int8", Cal(), "entropy", ["/a"]) == fp32.with_name(f"{old}-int8-entropy-{digest}")
    assert variant_dir(Path("rel"), "fp16") == Path("rel-fp16")
