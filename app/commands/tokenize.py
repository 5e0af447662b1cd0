"""offload-studio tokenize -m FILE (-p TEXT | -f FILE): token ids on one line, like llama-tokenize."""
from __future__ import annotations

from pathlib import Path

from engine.gguf.model_file import ModelFile
from engine.text.tokenizer import Tokenizer


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="text to tokenize")
    source.add_argument("-f", "--file", help="file whose text to tokenize")
    p.add_argument("--add-special", action="store_true", help="add BOS/EOS as the vocabulary says")
    p.add_argument("--parse-special", action="store_true", help="read special-token texts as special tokens")
    p.add_argument("--show-pieces", action="store_true", help="print each id with its text")


def run(args) -> int:
    text = args.prompt if args.prompt is not None else Path(args.file).read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_metadata(ModelFile(args.model).metadata)
    ids = tokenizer.encode(text, add_special=args.add_special, parse_special=args.parse_special)
    if args.show_pieces:
        for i in ids:
            print(f"{i:6d} -> {tokenizer.token_to_piece(i, special=True).decode('utf-8', 'replace')!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0
