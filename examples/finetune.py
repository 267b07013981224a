"""Fine-tune a Stable Diffusion model on a folder of captioned images (``cat.png`` + ``cat.txt``, ...).

    python examples/finetune.py --data my_images --out runs/cats --lora-rank 8 --steps 1000
    python examples/finetune.py --data my_images --out runs/cats --steps 2000     # full fine-tune

Writes orbax checkpoints to ``OUT/checkpoints`` (running again with the same ``--out`` resumes from the latest,
exactly) and at the end ``OUT/lora.safetensors`` (LoRA, for ``sdjax.convert.lora.apply_lora`` or diffusers) or
``OUT/model`` (a full fine-tune, as a diffusers folder ``sdjax.load`` reads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import sdjax
from sdjax.text import pad_to_chunks, token_ids
from sdjax.train import (
    TrainConfig,
    checkpoint_manager,
    create_train_state,
    export_diffusers,
    make_train_step,
    pipe_with_trained_params,
    restore_checkpoint,
    save_checkpoint,
    save_lora,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image(path: Path, size: int) -> np.ndarray:
    """Resize the short side to ``size``, center-crop to a square; (size, size, 3) float32 in [0, 1]."""
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0


def load_dataset(folder: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """Every image with a caption file next to it (``x.png`` + ``x.txt``); small datasets, held in memory."""
    pairs = [(p, p.with_suffix(".txt")) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    pairs = [(image, caption) for image, caption in pairs if caption.exists()]
    if not pairs:
        raise SystemExit(f"no captioned images in {folder} (expected pairs like cat.png + cat.txt)")
    images = np.stack([load_image(image, size) for image, _ in tqdm(pairs, desc="loading images")])
    return images, [caption.read_text().strip() for _, caption in pairs]


def batch_at(step: int, images: np.ndarray, ids: dict[str, np.ndarray], empty: dict[str, np.ndarray],
             args: argparse.Namespace) -> dict:
    """The batch of a given step: a function of (seed, step) only, so a resumed run sees the same data."""
    rng = np.random.default_rng([args.seed, step])
    index = rng.choice(len(images), args.batch_size, replace=len(images) < args.batch_size)
    # Caption dropout: some images train unconditionally, which classifier-free guidance relies on.
    drop = rng.random(args.batch_size) < args.caption_dropout
    input_ids = {name: np.where(drop[:, None], empty[name], ids[name][index]) for name in ids}
    return {"pixels": images[index], "input_ids": input_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of image + .txt caption pairs")
    parser.add_argument("--model", default=None, help="diffusers folder or single file (default: sdjax's model)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-rank", type=int, default=None, help="train a LoRA of this rank (default: full)")
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--offset-noise", type=float, default=0.0)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = sdjax.load(args.model)
    config = TrainConfig(learning_rate=args.lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                         train_text_encoder=args.train_text_encoder, ema_decay=args.ema_decay,
                         min_snr_gamma=args.min_snr_gamma, offset_noise=args.offset_noise, seed=args.seed)
    images, captions = load_dataset(args.data, args.resolution or pipe.default_size)
    # Captions as written (no emphasis syntax); long ones in several chunks, the empty caption padded to match.
    ids = {name: token_ids(pipe, captions, name, emphasis="none") for name in pipe.text_encoders}
    empty = {name: pad_to_chunks(token_ids(pipe, [""], name), ids[name].chunks,
                                 pipe.text_encoders[name].tokenizer).ids[0] for name in pipe.text_encoders}
    ids = {name: t.ids for name, t in ids.items()}

    state = create_train_state(pipe, config)
    manager = checkpoint_manager(args.out / "checkpoints")
    if manager.latest_step() is not None:
        state = restore_checkpoint(manager, state)
        print(f"resuming from step {int(state.step)}")
    train_step = make_train_step(pipe, config)

    with tqdm(range(int(state.step), args.steps), initial=int(state.step), total=args.steps) as bar:
        for step in bar:
            state, metrics = train_step(state, batch_at(step, images, ids, empty, args))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if (step + 1) % args.save_every == 0:
                save_checkpoint(manager, state)
    save_checkpoint(manager, state)

    if state.is_lora:
        print(f"LoRA: {save_lora(state, args.out / 'lora.safetensors')}")
    else:
        out = export_diffusers(pipe_with_trained_params(pipe, state), args.out / "model", force=True)
        print(f"model: {out}")


if __name__ == "__main__":
    main()
