"""Training recipe of the embedded demo model (``bitdance train-demo``), on CPU, reproducible from one seed.

1. the binary autoencoder and its decoder rounds (``train_ae``);
2. the prior, the diffusion head and the projector with the official objective (``train_prior``).

The result is a checkpoint directory in the official layout (config.json + model.safetensors, tokenizer
files, ae_config.json + ae.safetensors, vision_head_config.json + vision_head.safetensors,
projector.safetensors), loadable by the project's loader like any released BitDance checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitdance_core.demo import data as demo_data
from bitdance_core.demo.train_ae import (
    AEConfig,
    autoencoder_recon_score,
    encode_tokens,
    finetune_decoder,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from bitdance_core.demo.train_prior import DemoPriorTrainer, PriorConfig, block_mask, demo_head_config, train_prior
from bitdance_core.demo.train_utils import LossLog
from bitdance_core.families.text_to_image.tokenizer_build import build_tokenizer
from bitdance_core.models.autoencoder import BinaryAutoencoder

__all__ = ["AEConfig", "PriorConfig", "RecipeConfig", "block_mask", "main", "train_demo"]

logger = logging.getLogger(__name__)


@dataclass
class RecipeConfig:
    seed: int = 0
    num_images: int = 12000
    image_size: int = 64
    threads: int = 2
    ae: AEConfig = field(default_factory=AEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    bpe_vocab_size: int = 320
    max_res: int = 256
    recon_eval_images: int = 150  # fresh scenes the autoencoder's reconstructions are scored on


def _half(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(
    out_dir: Path,
    tok_dir: Path,
    ae: BinaryAutoencoder,
    ddconfig: dict,
    trainer: DemoPriorTrainer,
    dtype=torch.bfloat16,
) -> None:
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if tok_dir != out_dir:
            shutil.copyfile(tok_dir / name, out_dir / name)
    (out_dir / "ae_config.json").write_text(json.dumps({"ddconfig": ddconfig, "gan_decoder": False}, indent=2))
    save_file(_half(ae.state_dict(), dtype), str(out_dir / "ae.safetensors"))
    (out_dir / "vision_head_config.json").write_text(
        json.dumps(demo_head_config(trainer.cfg, trainer.c), indent=2)
    )
    save_file(_half(trainer.head.state_dict(), dtype), str(out_dir / "vision_head.safetensors"))
    save_file(_half(trainer.projector.state_dict(), dtype), str(out_dir / "projector.safetensors"))
    llm = trainer.llm
    llm.config.dtype = dtype
    llm.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    llm.float()
    gc = out_dir / "generation_config.json"
    if gc.exists():
        gc.unlink()


def train_demo(
    out_dir: str | Path,
    seed: int = 0,
    config: RecipeConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    ae: BinaryAutoencoder | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Run the whole recipe and write the checkpoint to ``out_dir``. Returns a summary (times, losses).

    ``work_dir`` (default ``out_dir``) receives ``train_log.jsonl`` and the AE intermediate. Pass a trained
    ``ae`` to skip stage 1 (e.g. to train a second prior, parallel_num 1, on the same tokens).
    ``init_from``: a checkpoint directory whose prior, head and projector weights start stage 2 (a further
    training round with a fresh optimizer and schedule); its autoencoder is used as ``ae``.
    """
    from transformers import AutoTokenizer

    cfg = config or RecipeConfig()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    log = LossLog(work / "train_log.jsonl")
    summary: dict = {"config": asdict(cfg), "seed": seed}
    t0 = time.time()
    images, captions, _ = demo_data.make_dataset(cfg.num_images, seed, cfg.image_size)
    summary["data_s"] = round(time.time() - t0, 1)

    t1 = time.time()
    if init_from is not None and ae is None:
        ae = load_autoencoder(init_from)
    trained_here = ae is None
    if ae is None:
        ae = train_autoencoder(images, cfg.ae, seed, log, progress)
    summary["ae_s"] = round(time.time() - t1, 1)
    t2 = time.time()
    latents = encode_tokens(ae, images)
    summary["encode_s"] = round(time.time() - t2, 1)
    if trained_here:
        t3 = time.time()
        for k, (steps, lr) in enumerate(cfg.ae.decoder_rounds):
            finetune_decoder(ae, latents, images, cfg.ae, seed + k, log, progress, steps=steps, lr=lr)
        summary["decoder_s"] = round(time.time() - t3, 1)
        save_autoencoder(work / "ae", ae)
    summary["ae_recon"] = autoencoder_recon_score(ae, seed, cfg.recon_eval_images)
    log.write(stage="ae_recon", **summary["ae_recon"])
    logger.info("autoencoder reconstruction scores: %s", summary["ae_recon"])
    grid = latents.shape[-1]

    tok_dir = out
    n_vocab = build_tokenizer(
        tok_dir, demo_data.corpus(), cfg.bpe_vocab_size, cfg.max_res, max(1, cfg.prior.parallel_num - 1)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    summary["vocab"] = n_vocab
    trainer = DemoPriorTrainer(cfg.prior, tokenizer, ae.z_channels, grid, seed)
    if init_from is not None:
        trainer.load_weights(init_from)
    t4 = time.time()
    prior_seed = seed if init_from is None else seed + 100  # a further round sees other batches
    train_prior(trainer, captions, latents, prior_seed, log, progress)
    summary["prior_s"] = round(time.time() - t4, 1)
    save_checkpoint(out, tok_dir, ae, ae.ddconfig, trainer)
    summary["total_s"] = round(time.time() - t0, 1)
    log.write(stage="done", **{k: v for k, v in summary.items() if k != "config"})
    log.close()
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo checkpoint written to %s (%.0f s)", out, summary["total_s"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitdance train-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-images", type=int, default=RecipeConfig.num_images)
    ap.add_argument("--ae-steps", type=int, default=AEConfig.steps)
    ap.add_argument("--decoder-steps", type=int, default=None, help="one decoder round of this many steps")
    ap.add_argument("--prior-steps", type=int, default=PriorConfig.steps)
    ap.add_argument("--parallel-num", type=int, default=PriorConfig.parallel_num)
    ap.add_argument("--prior-lr", type=float, default=PriorConfig.lr)
    ap.add_argument("--init-from", default=None, help="continue from this checkpoint (AE, prior, head, projector)")
    ap.add_argument("--work-dir", default=None, help="logs and intermediates (default: --out)")
    ap.add_argument("--ae-from", default=None, help="reuse the autoencoder of this checkpoint directory")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RecipeConfig(seed=args.seed, num_images=args.num_images, threads=args.threads)
    cfg.ae.steps = args.ae_steps
    if args.decoder_steps is not None:
        cfg.ae.decoder_rounds = ((args.decoder_steps, 1e-3),) if args.decoder_steps > 0 else ()
    cfg.prior.steps = args.prior_steps
    cfg.prior.parallel_num = args.parallel_num
    cfg.prior.lr = args.prior_lr
    ae = load_autoencoder(args.ae_from) if args.ae_from else None
    train_demo(args.out, args.seed, cfg, work_dir=args.work_dir, progress=not args.no_progress, ae=ae,
               init_from=args.init_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
