#!/usr/bin/env python3
"""Trains models/tokenizers/kjv-metaspace/tokenizer.json: a SentencePiece-style BPE as Mistral
and Phi-3 ship them (Metaspace pre-tokenizer with prepend_scheme "first", byte fallback, the
a decoder whose Strip drops the first space of a sequence), on the King James Bible from Debian's
bible-kjv, with Hugging Face tokenizers. The tokenizer tests compare edgellm with `tokenizers` on
it. Vocabulary 1280 (1024 merges and pieces beside the 256 byte tokens), so that text outside the Bible (accents, CJK, emoji) falls back to bytes.

Run: .edgellm/venv/bin/python models/metaspace_tokenizer.py   (needs `bible`: apt-get install bible-kjv)
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import read_kjv  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

out = Path(__file__).resolve().parent / "tokenizers" / "kjv-metaspace"
tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
# Mistral v0.3's decoder: the Metaspace decoder alone would drop byte-fallback tokens.
tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                 decoders.Strip(" ", 1, 0)])
byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
trainer = trainers.BpeTrainer(vocab_size=1024 + 256, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                              show_progress=False)
tok.train_from_iterator((text for _, text in read_kjv()), trainer=trainer)
out.mkdir(parents=True, exist_ok=True)
# The trainer takes the byte tokens only as special tokens; in a SentencePiece vocabulary they
# are ordinary pieces (decoded, never skipped), so they leave the added tokens and stay in the vocab.
config = json.loads(tok.to_str())
config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] not in byte_tokens]
(out / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n")
tok = Tokenizer.from_file(str(out / "tokenizer.json"))
print(f"wrote {out / 'tokenizer.json'}: vocab {tok.get_vocab_size()}")
