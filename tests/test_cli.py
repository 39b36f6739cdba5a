"""The `bitdance-rt` command as a user runs it: outputs, replayed noise, and one-line errors.

Most tests run the command in this process (conftest.run_cli: cli.main, as the console script calls
it); the embedded default and the cache shared by two runs go through `python -m bitdance_rt`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, fixture_config, fixture_dir, run_cli


@pytest.fixture(autouse=True)
def export_cache(warm_cache, monkeypatch):
    """Automatic ONNX exports go to this module's cache root, never the user's ~/.cache; it starts with the
    session's export of the embedded model (conftest warm_cache), which `eval` would make first. Tests of
    exporting into an empty cache set their own root."""
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(warm_cache))


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bitdance_rt", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=300,
    )


def sampling_args(name: str) -> list[str]:
    s = fixture_config(name)["sampling"]
    return [
        "--labels",
        *map(str, s["labels"]),
        "--steps",
        str(s["sample_steps"]),
        "--cfg",
        str(s["cfg_scale"]),
        "--cfg-schedule",
        s["cfg_schedule"],
    ]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", ["tiny_4x", "tiny_1x"])
def test_generate_replays_official_noise(name, backend, tmp_path):
    d = fixture_dir(name)
    out = tmp_path / "imgs"
    res = run_cli(
        "generate",
        "--model",
        d / "config.json",
        "--checkpoint",
        d / "checkpoint.pt",
        "--vae",
        d / "vae.pt",
        *sampling_args(name),
        "--noise-from",
        d / "sample.safetensors",
        "--save-tokens",
        tmp_path / "t.safetensors",
        "--out",
        out,
        "--quiet",
        "--backend",
        backend,
    )
    assert res.returncode == 0, res.stderr
    assert "images/s" in res.stdout and f"with {backend}" in res.stdout
    got, want = load_file(str(tmp_path / "t.safetensors")), load_file(str(d / "sample.safetensors"))
    assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["latent"], want["latent"])
    torch.testing.assert_close(got["image"], want["image"], atol=2e-4, rtol=0)
    assert sorted(p.name for p in out.iterdir()) == ["000_class3.png", "001_class7.png", "grid.png"]


def test_generate_with_seed_matches_official_and_converted_checkpoint(tmp_path):
    d = fixture_dir("tiny_4x")
    conv = tmp_path / "m.safetensors"
    res = run_cli("convert", "--checkpoint", d / "checkpoint.pt", "--model", d / "config.json", "--out", conv)
    assert res.returncode == 0, res.stderr
    seed = fixture_config("tiny_4x")["sampling"]["seed"]
    res = run_cli(
        "generate",
        "--model",
        "tiny-4x",
        "--checkpoint",
        conv,
        *sampling_args("tiny_4x"),
        "--seed",
        seed,
        "--save-tokens",
        tmp_path / "t.safetensors",
        "--out",
        tmp_path / "o",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    got, want = load_file(str(tmp_path / "t.safetensors")), load_file(str(d / "sample.safetensors"))
    assert torch.equal(got["tokens"], want["tokens"])


def test_embedded_default_is_the_trained_digits_model(tmp_path):
    res = run("generate", "--out", tmp_path / "o", "--steps", "2", "--labels", "0", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "tiny_digits.safetensors" in res.stdout and "RANDOM" not in res.stdout
    assert (tmp_path / "o" / "grid.png").is_file()


def test_preset_without_checkpoint_says_it_is_random(tmp_path):
    res = run_cli("generate", "--model", "tiny-4x", "--out", tmp_path / "o", "--steps", "2", "--labels", "0", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stdout


def test_eval_scores_the_embedded_model_identically_on_both_backends():
    """30 samples in chunks of 16 (the exported maximum): the same images, so the same scores."""
    scores = {}
    for backend in ("torch", "onnxruntime"):
        res = run_cli("eval", "--per-class", "3", "--backend", backend)
        assert res.returncode == 0, res.stderr
        assert f"{backend} fp32" in res.stdout
        scores[backend] = [l for l in res.stdout.splitlines() if l.startswith("class accuracy")]
        assert len(scores[backend]) == 1 and "on 30 samples" in scores[backend][0]
    assert scores["torch"] == scores["onnxruntime"]
    res = run_cli("eval", "--per-class", "3", "--batch-size", "0")
    assert res.returncode == 2 and "max batch must be a positive integer, got 0" in res.stderr


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--labels", "10"], "out of range"),
        (["--labels", "-1"], "out of range"),
        (["--steps", "0"], "steps must be an integer in 1..1000"),
        (["--checkpoint", "MISSING.pt"], "checkpoint not found"),
        (["--model", "BitDance-Z-9x"], "unknown model"),
        (["--noise-from", "MISSING.safetensors"], "noise file not found"),
    ],
)
def test_errors_are_one_actionable_line(extra, needle, tmp_path, monkeypatch, capsys):
    """In-process (cli.main, as the console script calls it: any other exception would propagate here as a
    traceback): exit code 2 and one line naming the problem, before anything is exported (an empty cache
    stays without exports). The process boundary itself: the subprocess tests around it."""
    from bitdance_rt.cli import main

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--out", str(tmp_path / "o"), "--quiet", "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "cache" / "exports").exists()


def test_unreadable_and_wrong_checkpoints_exit_cleanly(tmp_path, monkeypatch, capsys):
    """In-process, as test_errors_are_one_actionable_line."""
    from bitdance_rt.cli import main

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    d1 = fixture_dir("tiny_1x")
    for args, needle in [
        (["--checkpoint", str(junk)], "unreadable"),
        (["--model", "tiny-4x", "--checkpoint", str(d1 / "checkpoint.pt")], "does not fit model tiny-4x"),
    ]:
        assert main(["generate", "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_default_backend_is_onnxruntime_with_a_reused_cached_export(tmp_path, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))  # start empty
    args = ["generate", "--steps", "2", "--labels", "0", "--quiet"]
    first = run(*args, "--out", tmp_path / "a")
    second = run(*args, "--out", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "with onnxruntime" in first.stdout and "(exported)" in first.stdout
    assert "(reused)" in second.stdout
    assert (tmp_path / "a" / "000_class0.png").read_bytes() == (tmp_path / "b" / "000_class0.png").read_bytes()
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1


def test_export_command_then_generate_from_it(tmp_path):
    d = fixture_dir("tiny_4x")
    s = fixture_config("tiny_4x")["sampling"]
    exp = tmp_path / "exp"
    base = ["--model", d / "config.json", "--checkpoint", d / "checkpoint.pt"]
    res = run_cli("export", *base, "--out", exp, "--steps", s["sample_steps"])
    assert res.returncode == 0 and "exported" in res.stdout, res.stderr
    res = run_cli("export", *base, "--out", exp, "--steps", s["sample_steps"])
    assert res.returncode == 0 and "up to date, reused" in res.stdout, res.stderr
    res = run_cli(
        "generate",
        "--model",
        d / "config.json",
        "--checkpoint",
        d / "checkpoint.pt",
        "--export-dir",
        exp,
        *sampling_args("tiny_4x"),
        "--seed",
        s["seed"],
        "--save-tokens",
        tmp_path / "t.safetensors",
        "--out",
        tmp_path / "o",
        "--quiet",
        "--backend",
        "onnxruntime",
    )
    assert res.returncode == 0, res.stderr
    want = load_file(str(d / "sample.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["tokens"], want["tokens"])
    res = run_cli(
        "generate",
        "--model",
        fixture_dir("tiny_1x") / "config.json",
        "--export-dir",
        exp,
        "--quiet",
        "--backend",
        "onnxruntime",
        "--out",
        tmp_path / "o2",
        "--steps",
        "2",
    )
    assert res.returncode == 2 and "not 'tiny_1x'" in res.stderr and "Traceback" not in res.stderr
    (exp / "decoder.onnx").write_bytes(b"broken")
    res = run_cli(
        "generate",
        "--model",
        d / "config.json",
        "--export-dir",
        exp,
        "--quiet",
        "--backend",
        "onnxruntime",
        "--out",
        tmp_path / "o3",
        "--steps",
        "2",
    )
    assert res.returncode == 2 and "decoder.onnx" in res.stderr and "Traceback" not in res.stderr


def test_calibrate_writes_a_set_for_the_embedded_model(tmp_path):
    from bitdance_rt.calibration import load_calibration
    from bitdance_rt.loading import load_model

    out = tmp_path / "calib"
    res = run_cli("calibrate", "--out", out, "--steps", "4", "--labels", "1", "2", "--max-samples", "8")
    assert res.returncode == 0, res.stderr
    assert "wrote calibration set" in res.stdout
    cal = load_calibration(out, config=load_model().model.cfg)
    assert all(0 < len(s) <= 8 for s in cal.samples.values())
    res = run_cli("calibrate", "--out", out, "--steps", "4")
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr


def test_export_at_a_precision_takes_the_max_batch(tmp_path):
    """`export --precision fp16 --max-batch 1` derives from the max-batch-1 FP32 export, so what `plan
    --batch-size 1` assumes is what the command makes (it refused --max-batch with --precision)."""
    import json

    res = run_cli("export", "--precision", "fp16", "--max-batch", "1", "--steps", "2", "--out", tmp_path / "fp16")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["key"]["limits"]["max_batch"] == 1


def test_renamed_flags_keep_their_old_spellings(capsys):
    """One name per meaning on every command: the images a batch holds (the Pipeline's and the graphs' max
    batch) is --max-batch, an export directory --export-dir, the INT8 range method --calib-method; the old
    spellings still parse, --help shows only the new ones, and giving both is an error."""
    from bitdance_rt.cli import build_parser

    parser = build_parser()
    for command in ("generate", "eval", "serve", "plan"):
        assert parser.parse_args([command, "--max-batch", "3"]).batch_size == 3
        assert parser.parse_args([command, "--batch-size", "3"]).batch_size == 3
    assert parser.parse_args(["calibrate", "--out", "o", "--batch-size", "2"]).batch_size == 2  # its own meaning
    assert parser.parse_args(["build", "--export-dir", "e"]).export == "e"
    assert parser.parse_args(["build", "--export", "e"]).export == "e"
    assert parser.parse_args(["build", "--export-dir", "e", "--device", "cuda:1"]).device == 1
    assert parser.parse_args(["build", "--export-dir", "e", "--device", "2"]).device == 2
    assert parser.parse_args(["calibrate", "--out", "o", "--calib-method", "entropy"]).method == "entropy"
    assert parser.parse_args(["calibrate", "--out", "o", "--method", "entropy"]).method == "entropy"
    assert parser.parse_args(["calibrate", "--out", "o"]).method == "max"
    helps = {
        c: parser._subparsers._group_actions[0].choices[c].format_help()
        for c in ("generate", "build", "calibrate", "plan")
    }
    assert "--export-dir DIR" in helps["build"] and "--export " not in helps["build"]
    assert "--max-batch N" in helps["generate"] and "--batch-size" not in helps["generate"]
    assert "--max-batch N" in helps["plan"] and "--batch-size" not in helps["plan"]
    assert "--calib-method" in helps["calibrate"] and "--method" not in helps["calibrate"]
    for argv, needle in (
        (["build"], "--export-dir is required"),
        (["build", "--export", "a", "--export-dir", "b"], "not allowed with"),
        (["generate", "--max-batch", "2", "--batch-size", "3"], "not allowed with"),
        (["build", "--export-dir", "a", "--device", "gpu"], "expected cuda, cuda:N"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert needle in capsys.readouterr().err
