"""Derive the CLIP tokenizer files shipped with sdjax from OpenAI's BPE merges list.

The source is ``bpe_simple_vocab_16e6.txt.gz`` as shipped in the open-clip-torch wheel (``open_clip/``), the
same file OpenAI's CLIP repository ships. The vocabulary is built exactly as CLIP's ``SimpleTokenizer`` builds
it, and written in the Hugging Face layout of ``openai/clip-vit-large-patch14``:

- ``bpe/vocab.json``: 49408 tokens: the 256 byte-level characters, the same with ``</w>``, one token per merge
  (48894), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
- ``bpe/merges.txt``: ``#version: 0.2`` followed by the 48894 merges used.
- ``clip/tokenizer_config.json`` and ``openclip/tokenizer_config.json``: the two special-token conventions.
  SD 1.x pads with ``<|endoftext|>``; OpenCLIP (SD 2.x, SDXL's second encoder) pads with ``!`` (id 0).
  ``sdjax.tokenizer.load_tokenizer`` loads a convention folder with the shared ``bpe/`` files.

Usage: ``python make_tokenizer_files.py SOURCE`` where SOURCE is the ``.txt.gz`` file or an open-clip-torch
wheel; without SOURCE the installed ``open_clip`` package's copy is used. Files are written beside this script.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges (line 0 of the file is a header).
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
PAD_TOKENS = {"clip": EOS, "openclip": "!"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (same order as CLIP's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_source(source: Path | None) -> bytes:
    if source is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no SOURCE given and open_clip is not installed")
        source = Path(next(iter(spec.submodule_search_locations))) / GZ_NAME
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(f"open_clip/{GZ_NAME}")
    return source.read_bytes()


def build(gz_bytes: bytes) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(tokens) != 49408:
        raise SystemExit(f"unexpected vocabulary: {len(tokens)} tokens, {len(vocab)} distinct")
    return vocab, merges


def write(out: Path, vocab: dict[str, int], merges: list[str]) -> None:
    (out / "bpe").mkdir(parents=True, exist_ok=True)
    (out / "bpe" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "bpe" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for convention, pad in PAD_TOKENS.items():
        folder = out / convention
        folder.mkdir(exist_ok=True)
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": pad,
        }
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help=f"{GZ_NAME} or an open-clip-torch wheel")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    args = parser.parse_args()
    vocab, merges = build(read_source(args.source))
    write(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
