"""Train the embedded tiny BitDance (class-conditional digits, 32px, 4 tokens per AR step) on a CPU.

    pip install scikit-learn                     # the data (ships inside scikit-learn; no download)
    python recipes/train_tiny.py                 # everything, ~17 min on one CPU core
    python recipes/train_tiny.py --stage eval    # re-run the cfg/steps sweep on saved weights

Stages (each saves its result under --work, so a later stage can be re-run alone):
  1. classifier  a small CNN judge on the train split (held-out accuracy is reported, >= 95% needed)
  2. tokenizer   the binary autoencoder: encoder -> sign (straight-through) -> decoder, L1+MSE loss
  3. generator   backbone + transformer diffusion head on the tokenizer's +/-1 tokens: one
                 teacher-forced pass per batch with the block-causal mask, the official v-loss
                 (logit-normal t, x-prediction net, diff_batch_mul repeats), 10% class dropout
  4. eval        sweeps cfg scale and sampler steps with the runtime's own generate(), picks the
                 best by classifier accuracy, writes the assets, the config JSON and a sample grid

Data: scikit-learn's digits (8x8, shipped inside scikit-learn; no download), upscaled to 32x32 RGB
in [-1, 1]; a per-class 80/20 split (seed 0): the generator and the classifier see only the train
split; the held-out split scores the classifier and is the real reference of the Fréchet distance.
Every stage is seeded; run on one thread, results are reproducible on the same machine.
This recipe is not part of the runtime package; it only uses the package's classes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bitdance_rt.checkpoint import save_safetensors  # noqa: E402
from bitdance_rt.config import ASSETS_DIR, ModelConfig, VAEConfig  # noqa: E402
from bitdance_rt.models import BitDance  # noqa: E402
from bitdance_rt.models.layout import attention_mask_table, latent_to_tokens  # noqa: E402
from bitdance_rt.quality import DigitsClassifier, digits_to_images  # noqa: E402
from bitdance_rt.quality.data import split_digits  # noqa: E402
from bitdance_rt.quality.metrics import class_accuracy, features, frechet_from_features  # noqa: E402

ASSETS = ASSETS_DIR  # written into the package: bitdance_rt/assets
RES = 32

CONFIG = ModelConfig(
    name="tiny-digits",
    dim=96,
    n_layer=3,
    n_head=4,
    diff_layers=2,
    diff_dim=64,
    diff_adanln_layers=1,
    latent_dim=16,
    down_size=8,
    resolution=RES,
    cls_token_num=2,
    num_classes=10,
    parallel_num=4,
    parallel_mode="patch",
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16),
    default_cfg=3.0,
    default_steps=25,
    training_args=(("class_dropout_prob", 0.1), ("diff_batch_mul", 4)),
)


def log(msg: str) -> None:
    print(msg, flush=True)


def shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translations in [-max_shift, max_shift] (background -1 fills the border)."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- 1. classifier ------------------------------------------------------------------------
def train_classifier(train, held, steps: int, seed: int = 0) -> DigitsClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = digits_to_images(train[0], RES), train[1]
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 2e-3, 50)
        idx = torch.randint(0, len(x), (64,), generator=gen)
        xb = shift(x[idx], 2, gen)
        xb = (xb + 0.1 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)  # robust to sample noise
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    acc = class_accuracy(net, digits_to_images(held[0], RES), held[1])
    log(f"  classifier: held-out accuracy {100 * acc:.2f}% ({len(held[1])} images)")
    return net


# ---- 2. tokenizer -------------------------------------------------------------------------
def train_tokenizer(model: BitDance, train, held, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vae = model.vae
    x = digits_to_images(train[0], RES)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 2e-3)
        xb = shift(x[torch.randint(0, len(x), (32,), generator=gen)], 2, gen)
        pre = vae.encoder(xb)
        bits = torch.where(pre > 0, 1.0, -1.0)
        z = pre + (bits - pre).detach()  # sign with a straight-through gradient
        rec = vae.decoder(z)
        commit = (pre - bits.detach()).pow(2).mean()  # keep the encoder's outputs near +/-1
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + 0.05 * commit
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"  tokenizer step {step:5d}  loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def recon_metrics(model: BitDance, images: torch.Tensor) -> tuple[float, float]:
    rec = model.decode(model.encode(images)).clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (images + 1) / 2).item()
    return mse, 10 * math.log10(1.0 / mse)


# ---- 3. generator -------------------------------------------------------------------------
def generator_params(model: BitDance):
    return [p for n, p in model.named_parameters() if not n.startswith("vae.")]


def teacher_forced_loss(
    model: BitDance, tokens: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, diff_batch_mul: int = 4
) -> torch.Tensor:
    """Official BitDance.forward + DiffHead.forward, through the package's modules.

    tokens [B, N, C] (+/-1, generation order); labels [B] (some already dropped to the null class).
    """
    cfg = model.cfg
    b, n, c = tokens.shape
    p = cfg.parallel_num
    x = torch.cat([model.prefix_embed(labels), model.proj_in(tokens[:, :-p])], dim=1)
    # One pass over the whole sequence (no cache) with the block-causal mask table.
    hidden, _ = model.backbone(x, 0, chunk_mask=attention_mask_table(cfg).to(x.device))
    cond = hidden[:, -n:] + model.pos_for_diff.weight  # [B, N, dim]
    cond = cond.reshape(-1, p, cfg.dim).repeat(diff_batch_mul, 1, 1)
    target = tokens.reshape(-1, p, c).repeat(diff_batch_mul, 1, 1)
    rows = target.shape[0]
    t = torch.randn(rows, generator=gen).sigmoid()  # logit-normal (P_mean 0, P_std 1), time_shift 1
    e = torch.randn(target.shape, generator=gen)
    ti = t.view(-1, 1, 1)
    z = (1 - ti) * e + ti * target
    v = (target - z) / (1 - ti).clamp_min(0.05)
    x_pred = model.head(z, t, cond)
    v_pred = (x_pred - z) / (1 - ti).clamp_min(0.05)
    return (v - v_pred).pow(2).mean()


@torch.no_grad()
def encode_dataset(model: BitDance, train, copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the train split plus `copies` randomly shifted copies (shift <= 1 px)."""
    gen = torch.Generator().manual_seed(seed + 2)
    x = digits_to_images(train[0], RES)
    toks, labs = [], []
    for k in range(copies + 1):
        xs = x if k == 0 else shift(x, 1, gen)
        for i in range(0, len(xs), 256):
            toks.append(latent_to_tokens(model.encode(xs[i : i + 256]), model.cfg))
        labs.append(train[1])
    return torch.cat(toks), torch.cat(labs)


def train_generator(model: BitDance, tokens, labels, steps: int, batch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 3)
    params = generator_params(model)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 1e-3, 200)
        idx = torch.randint(0, len(tokens), (batch,), generator=gen)
        lab = labels[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # class dropout -> null class, for CFG
        lab[drop] = model.cfg.num_classes
        loss = teacher_forced_loss(model, tokens[idx], lab, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log(f"  generator step {step:5d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return model.state_dict()


# ---- 4. evaluation --------------------------------------------------------------------------
def generate_images(model: BitDance, labels, steps: int, cfg: float, seed: int, schedule: str = "linear"):
    from bitdance_rt.runtime import generate
    from bitdance_rt.runtime.torch_backend import TorchBackend
    from bitdance_rt.sampling import SeededNoise

    return generate(TorchBackend(model), labels, steps, cfg, schedule, SeededNoise(seed)).image.clamp(-1, 1)


def evaluate(
    model: BitDance, clf: DigitsClassifier, held, n_per_class: int, steps: int, cfg: float, seed: int = 0
) -> dict:
    labels = [c for c in range(10) for _ in range(n_per_class)]
    images = generate_images(model, labels, steps, cfg, seed)
    real = features(clf, digits_to_images(held[0], RES))
    return {
        "cfg": cfg,
        "steps": steps,
        "n": len(labels),
        "accuracy": class_accuracy(clf, images, labels),
        "frechet": frechet_from_features(features(clf, images), real),
    }


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    from PIL import Image

    images = F.pad(images.clamp(-1, 1), (1, 1, 1, 1), value=-0.5)  # grey frame around each image
    b, _, h, w = images.shape
    cols = b // rows
    img = ((images + 1) * 127.5).round().to(torch.uint8)
    grid = img.view(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    Image.fromarray(grid.numpy()).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=("all", "classifier", "tokenizer", "generator", "eval"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bitdance_tiny_digits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clf-steps", type=int, default=1500)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--gen-steps", type=int, default=5000)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--copies", type=int, default=8, help="shifted copies of the train split for the generator")
    ap.add_argument("--eval-per-class", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    args.work.mkdir(parents=True, exist_ok=True)
    ASSETS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    times = {}
    train, held = split_digits(args.seed)
    log(f"data: {len(train[1])} train / {len(held[1])} held-out digits, {RES}x{RES} RGB")
    save_safetensors(
        {"digits": held[0], "labels": held[1]},
        ASSETS / "digits_heldout.safetensors",
        {"source": "scikit-learn load_digits (UCI optdigits), per-class 20% split, seed 0"},
    )
    torch.manual_seed(args.seed)
    model = BitDance(CONFIG)  # the initial weights of every stage come from this seeded draw
    clf_path, vae_path, gen_path = (
        args.work / f for f in ("classifier.safetensors", "tokenizer.safetensors", "model.safetensors")
    )
    stages = ("classifier", "tokenizer", "generator", "eval")
    run = stages if args.stage == "all" else (args.stage,)

    if "classifier" in run:
        t0 = time.perf_counter()
        log("[1/4] classifier")
        clf = train_classifier(train, held, args.clf_steps, args.seed)
        save_safetensors(clf.state_dict(), clf_path)
        times["classifier"] = time.perf_counter() - t0
    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(clf_path)))
    clf.eval()

    if "tokenizer" in run:
        t0 = time.perf_counter()
        log("[2/4] tokenizer")
        train_tokenizer(model, train, held, args.vae_steps, args.seed)
        save_safetensors(model.vae.state_dict(), vae_path)
        times["tokenizer"] = time.perf_counter() - t0
    held_images = digits_to_images(held[0], RES)
    if run == ("classifier",):
        log(f"time: classifier {times['classifier']:.0f}s")
        return
    model.vae.load_state_dict(load_file(str(vae_path)))
    model.eval()
    mse, psnr = recon_metrics(model, held_images)
    with torch.no_grad():
        rec_acc = class_accuracy(clf, model.decode(model.encode(held_images)).clamp(-1, 1), held[1])
    log(
        f"  tokenizer: held-out reconstruction MSE {mse:.5f} (PSNR {psnr:.2f} dB, images in [0,1]), "
        f"classifier accuracy on reconstructions {100 * rec_acc:.2f}%"
    )

    if "generator" in run:
        t0 = time.perf_counter()
        log("[3/4] generator")
        tokens, labels = encode_dataset(model, train, args.copies, args.seed)
        log(f"  {len(tokens)} token sequences of {tokens.shape[1]} x {tokens.shape[2]} bits")
        sd = train_generator(model, tokens, labels, args.gen_steps, args.gen_batch, args.seed)
        save_safetensors(sd, gen_path)
        times["generator"] = time.perf_counter() - t0
    if "eval" in run:
        model.load_state_dict(load_file(str(gen_path)), strict=True)
        model.eval()
        t0 = time.perf_counter()
        log("[4/4] eval: cfg x steps sweep (linear cfg schedule), classifier accuracy / Fréchet distance")
        results = []
        for steps in (10, 25):
            for cfg in (1.0, 2.0, 3.0, 4.0, 6.0):
                r = evaluate(model, clf, held, args.eval_per_class, steps, cfg, seed=1)
                results.append(r)
                log(
                    f"  steps {steps:3d} cfg {cfg:4.1f}: accuracy {100 * r['accuracy']:.1f}%  "
                    f"Fréchet {r['frechet']:.2f}  (n={r['n']})"
                )
        best = max(results, key=lambda r: (round(r["accuracy"], 2), -r["frechet"]))
        final = evaluate(model, clf, held, 50, best["steps"], best["cfg"], seed=2)
        real_train = features(clf, digits_to_images(train[0][: final["n"]], RES))  # as many as generated
        baseline = frechet_from_features(real_train, features(clf, held_images))
        log(
            f"  chosen: steps {best['steps']} cfg {best['cfg']}: accuracy {100 * final['accuracy']:.1f}% "
            f"Fréchet {final['frechet']:.2f} on {final['n']} fresh samples "
            f"(real train vs held-out Fréchet {baseline:.2f})"
        )
        cfg = CONFIG.replace(default_cfg=best["cfg"], default_steps=best["steps"])
        (ASSETS / "tiny_digits.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
        meta = {
            "recipe": "recipes/train_tiny.py",
            "seed": str(args.seed),
            "held_out_psnr_db": f"{psnr:.2f}",
            "generated_accuracy": f"{final['accuracy']:.4f}",
        }
        save_safetensors(model.state_dict(), ASSETS / "tiny_digits.safetensors", meta)
        save_safetensors(
            clf.state_dict(),
            ASSETS / "digits_classifier.safetensors",
            {"held_out_accuracy": f"{class_accuracy(clf, held_images, held[1]):.4f}"},
        )
        grid_labels = [c for _ in range(6) for c in range(10)]
        grid = generate_images(model, grid_labels, best["steps"], best["cfg"], seed=3)
        (REPO / "docs").mkdir(exist_ok=True)
        save_grid(grid, 6, REPO / "docs" / "tiny_digits_grid.png", scale=2)
        (args.work / "eval.json").write_text(
            json.dumps(
                {
                    "sweep": results,
                    "final": final,
                    "real_frechet_baseline": baseline,
                    "recon_mse": mse,
                    "recon_psnr": psnr,
                    "recon_classifier_accuracy": rec_acc,
                },
                indent=2,
            )
        )
        times["eval"] = time.perf_counter() - t0

    total = time.perf_counter() - started
    log(
        "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total:.0f}s "
        f"({torch.get_num_threads()} thread(s))"
    )


if __name__ == "__main__":
    main()
