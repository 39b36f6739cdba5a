"""export/reader.py open_export: the one reader of an export directory (manifest, config, stage
contracts, graph precision, the "another model" check), and the constants defined once.

Fast: manifests are written directly (no torch export); the files they list are made up."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from bitdance_rt import stages as st
from bitdance_rt.config import load_config
from bitdance_rt.errors import BitDanceError
from bitdance_rt.export.manifest import MANIFEST, manifest_key, write_manifest
from bitdance_rt.export.reader import ExportInfo, config_differences, graph_precision, open_export

from conftest import fixture_dir

S = 4
SOURCE = "sha256:" + "1" * 64


def _cfg(name: str = "tiny_4x"):
    return load_config(fixture_dir(name) / "config.json")


def _write(directory, cfg, stages=st.GENERATION_STAGES, precision=None, files=None):
    limits = st.Limits(max_batch=8, opt_batch=2)
    specs = st.stage_specs(cfg, stages, S, limits)
    manifest = {
        "key": manifest_key(cfg, SOURCE, stages, 17, S, limits),
        "stages": {n: specs[n].to_json() for n in stages},
        "stage_files": {n: [f"{n}.onnx"] for n in stages},
        "files": files or {},
    }
    if precision is not None:
        manifest["precision"] = precision
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(directory, manifest)
    return directory


def test_open_export_reads_everything_once(tmp_path):
    cfg = _cfg()
    d = _write(tmp_path / "e", cfg)
    info = open_export(d, expect_config=cfg, expect_source=SOURCE, generation=True)
    assert isinstance(info, ExportInfo) and info.directory == d and info.manifest_path == d / MANIFEST
    assert info.config == cfg and sorted(info.specs) == sorted(st.GENERATION_STAGES)
    assert info.precision == "fp32" and info.sampler_steps == S and info.source == SOURCE and info.max_batch == 8
    assert open_export(_write(tmp_path / "i", cfg, precision="int8")).precision == "int8"


def test_file_checks_are_separate(tmp_path):
    d = _write(tmp_path / "e", _cfg())
    info = open_export(d)  # the files are not looked at until verify_files
    with pytest.raises(BitDanceError, match="no files recorded for stage decoder"):
        info.stage_files(st.DECODER)
    (d / "decoder.onnx").write_bytes(b"abc")
    d = _write(d, _cfg(), files={"decoder.onnx": {"bytes": 4, "sha256": "0" * 64}})
    with pytest.raises(BitDanceError, match=r"decoder\.onnx has 3 bytes"):
        open_export(d).verify_files(hashes=False)


def test_another_model_names_the_differing_fields(tmp_path):
    cfg = _cfg("tiny_4x")
    d = _write(tmp_path / "e", cfg)
    other = _cfg("tiny_1x")
    with pytest.raises(BitDanceError, match="another config") as err:
        open_export(d, expect_config=other)
    msg = str(err.value)
    assert f"{d / MANIFEST} was exported for model {cfg.name!r}, not {other.name!r}" in msg
    assert f"re-export {d} for this model" in msg and "\n" not in msg
    diff = config_differences(
        {"constructor_args": cfg.to_json_dict()["constructor_args"]},
        {"constructor_args": other.to_json_dict()["constructor_args"]},
    )
    assert diff and diff[0] in msg  # "constructor_args.<field> <export's> vs <expected>"
    open_export(
        d, expect_config=dataclasses.replace(cfg, name="same-architecture")
    )  # the name alone is not the architecture
    with pytest.raises(BitDanceError, match="another checkpoint"):
        open_export(d, expect_source="sha256:" + "2" * 64)


def test_config_differences():
    assert config_differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}}) == [
        "b.c 2 vs 5",
        "b.d 3 vs None",
    ]
    assert config_differences({"a": 1}, {"a": 1}) == []


def test_generation_needs_its_stages(tmp_path):
    d = _write(tmp_path / "e", _cfg(), stages=[st.HEAD_STEP])
    assert list(open_export(d).specs) == [st.HEAD_STEP]
    with pytest.raises(BitDanceError, match="lacks stage"):
        open_export(d, generation=True)


def test_unknown_graph_precision_and_bad_manifests(tmp_path):
    with pytest.raises(BitDanceError, match="unknown graph precision 'fp8'"):
        open_export(_write(tmp_path / "e", _cfg(), precision="fp8"))
    assert graph_precision({}) == "fp32"
    with pytest.raises(BitDanceError, match="export directory not found"):
        open_export(tmp_path / "nowhere")
    d = _write(tmp_path / "m", _cfg())
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["stages"][st.DECODER]["outputs"] = []
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BitDanceError, match="stage contracts differ"):
        open_export(d)


def test_reader_is_torch_free(tmp_path):
    """The engine build (no torch on Jetson) opens exports with it."""
    import subprocess

    code = (
        "import sys\nfrom bitdance_rt.export.reader import open_export\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ---- facts defined once ------------------------------------------------------------------------
def test_precisions_and_defaults_are_one_definition():
    from bitdance_rt import backends, cli
    from bitdance_rt.engines import cache, options
    from bitdance_rt.paths import DEFAULT_MAX_BATCH as paths_max_batch
    from bitdance_rt.precision.policy import DEFAULT_PRECISION, PRECISIONS

    assert backends.PRECISIONS is PRECISIONS and options.PRECISIONS is PRECISIONS
    assert DEFAULT_PRECISION == PRECISIONS[0] == "fp32"
    # an engine precision list, another fact; INT4 graphs (MatMulNBits) run on ONNX Runtime only so far
    assert set(PRECISIONS) - {"int4"} <= set(cache.ENGINE_PRECISIONS)
    assert st.DEFAULT_MAX_BATCH is paths_max_batch and st.Limits().max_batch == st.DEFAULT_MAX_BATCH
    assert backends.BackendOptions().max_batch == st.DEFAULT_MAX_BATCH
    parser = cli.build_parser()
    assert parser.parse_args(["generate"]).batch_size == st.DEFAULT_MAX_BATCH
    assert parser.parse_args(["export", "--out", "x"]).max_batch == st.DEFAULT_MAX_BATCH


def test_opset_is_one_definition():
    """The torch-free readers take the opsets from export/manifest.py; the exporter must agree."""
    pytest.importorskip("onnx")
    from bitdance_rt import cli
    from bitdance_rt.export import manifest, onnx_export

    assert (onnx_export.DEFAULT_OPSET, onnx_export.MIN_OPSET, onnx_export.MAX_OPSET) == (
        manifest.DEFAULT_OPSET,
        manifest.MIN_OPSET,
        manifest.MAX_OPSET,
    )
    assert cli.build_parser().parse_args(["export", "--out", "x"]).opset == manifest.DEFAULT_OPSET
