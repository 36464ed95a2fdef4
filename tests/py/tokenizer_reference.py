"""What Hugging Face tokenizers makes of texts and ids: the reference for edgellm's Tokenize,
Detokenize and streamed text.

stdin: {"tokenizer": path, "texts": [str], "sequences": [[prompt_ids, output_ids]]}
stdout: {"encoded": [ids of encode(text, add_special_tokens=True)],
         "decoded": [decode(those ids, skip_special_tokens=True)],
         "continuations": [decode(prompt + output) minus decode(prompt)]}
"""
import json
import sys

from tokenizers import Tokenizer

request = json.load(sys.stdin)
tok = Tokenizer.from_file(request["tokenizer"])
encoded = [tok.encode(text, add_special_tokens=True).ids for text in request["texts"]]
decoded = [tok.decode(ids, skip_special_tokens=True) for ids in encoded]
continuations = []
for prompt, output in request["sequences"]:
    before = tok.decode(prompt, skip_special_tokens=True)
    after = tok.decode(prompt + output, skip_special_tokens=True)
    assert after.startswith(before), f"decode(prompt) {before!r} is not a prefix of {after!r}"
    continuations.append(after[len(before):])
json.dump({"encoded": encoded, "decoded": decoded, "continuations": continuations}, sys.stdout, ensure_ascii=False)
