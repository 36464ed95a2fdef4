"""What Hugging Face tokenizers makes of texts and ids: the reference for edgellm's Tokenize,
Detokenize and streamed text.

stdin: {"tokenizer": path, "texts": [str], "sequences": [[prompt_ids, output_ids]]}
stdout: {"encoded": [ids of encode(text, add_special_tokens=True)],
         "decoded": [decode(those ids, skip_special_tokens=True)],
         "continuations": [decode(prompt + output) minus decode(prompt)],
         "id_bound": one more than the largest id, added tokens included,
         "last_id_decoded": decode([id_bound - 1])}
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
id_bound = max(tok.get_vocab(with_added_tokens=True).values()) + 1
json.dump(
    {
        "encoded": encoded,
        "decoded": decoded,
        "continuations": continuations,
        "id_bound": id_bound,
        "last_id_decoded": tok.decode([id_bound - 1], skip_special_tokens=True),
    },
    sys.stdout,
    ensure_ascii=False,
)
