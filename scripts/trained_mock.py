#!/usr/bin/env python3
"""A small Qwen3 checkpoint with learned structure, trained on the CPU, deterministically, and cached.

Random-weight mocks give near-uniform next-token distributions, on which every quant type looks alike.
Tests that need a model that has learned something (quant quality ordering, size-targeted mixes) use
this one: the q256 Qwen3 mock of scripts/make_mocks.py (256-wide rows, so the K-quants apply without
fallbacks; its byte-level BPE tokenizer), trained for a fixed number of AdamW steps on English text
from the grammar below.

The text. The build machines reach no web site, and a book excerpt typed from memory would not be the
book. So the text is generated here by a fixed grammar with a fixed seed: it is public domain by
construction (this file), byte-for-byte reproducible, of any size, and has real structure a tiny model
can learn and a quantized one can lose: word order and subject-verb agreement, counting sequences,
small sums written in words ("three and four make seven"), and quoted dialogue. `structured_text(seed)`
gives other text of the same grammar for evaluation (held out from training by its seed).

Cached under ~/.cache/gguforge-tests/trained/<hash of the recipe, this file's grammar and the mock
tokenizer>, so a warm test session loads it in milliseconds; a cold build takes about 140 s of CPU time
(90 AdamW steps of 8 x 64 tokens). Tests get it from the `trained_model` fixture (tests/conftest.py).

    python scripts/trained_mock.py          # build (if needed) and print the directory
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import sys
from pathlib import Path

CACHE = Path(os.environ.get("GGUFORGE_TEST_CACHE", Path.home() / ".cache" / "gguforge-tests"))

RECIPE = dict(arch="qwen3", size="q256", seed=0, text_seed=1, paragraphs=400, steps=90, batch=8, seq=64,
              lr=4e-3, warmup=8, weight_decay=0.0)
EVAL_SEED = 2  # structured_text(EVAL_SEED): held-out text of the same grammar

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
NOUNS = ("fox dog cat bird horse farmer miller sailor child king queen river forest hill road boat lamp "
         "garden window letter song").split()
ADJECTIVES = "red quick lazy old young small tall quiet bright dark green gentle brave tired".split()
VERBS = "see follow help watch call find carry hear greet answer".split()
PLACES = "the river|the old mill|the dark forest|the green hill|the market|the harbour|the king's road".split("|")
PREPS = "near|beside|behind|across|far from".split("|")
NAMES = "Anna|Tom|Mira|Jonas|Elsa|Peter".split("|")


def _np(r: random.Random, plural: bool) -> str:
    adj = f"{r.choice(ADJECTIVES)} " if r.random() < 0.6 else ""
    noun = r.choice(NOUNS)
    if plural:
        noun += "es" if noun.endswith(("x", "s", "ch", "sh")) else "s"
    return f"the {adj}{noun}"


def _sentence(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.45:
        plural = r.random() < 0.4
        verb = r.choice(VERBS)
        verb = verb if plural else (verb + "es" if verb.endswith(("sh", "ch", "s", "x")) else verb + "s")
        s = f"{_np(r, plural)} {verb} {_np(r, r.random() < 0.3)}"
        if r.random() < 0.5:
            s += f" {r.choice(PREPS)} {r.choice(PLACES)}"
        return s[0].upper() + s[1:] + "."
    if kind < 0.65:
        a, b = r.randrange(0, 11), r.randrange(0, 10)
        return f"{NUMBERS[a].capitalize()} and {NUMBERS[b]} make {NUMBERS[a + b]}."
    if kind < 0.8:
        start, n = r.randrange(0, 14), r.randrange(3, 7)
        return ", ".join(NUMBERS[start:start + n]).capitalize() + "."
    name, other = r.sample(NAMES, 2)
    place = r.choice(PLACES)
    return f"\"Where is {other}?\" asked {name}. \"{other} is at {place},\" said {_np(r, False)}."


def structured_text(seed: int, paragraphs: int = 300) -> str:
    """Paragraphs of 3-7 sentences from the grammar above; the same seed gives the same text."""
    r = random.Random(seed)
    return "\n\n".join(" ".join(_sentence(r) for _ in range(r.randrange(3, 8))) for _ in range(paragraphs)) + "\n"


def recipe_key() -> str:
    import make_mocks
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for fn in (_np, _sentence, structured_text, _train):
        h.update(inspect.getsource(fn).encode())
    h.update(repr((NUMBERS, NOUNS, ADJECTIVES, VERBS, PLACES, PREPS, NAMES)).encode())
    h.update(make_mocks.tokenizer_json(RECIPE["arch"]).encode())
    return h.hexdigest()[:16]


def _train(model, ids, r: dict) -> list[float]:
    import torch
    torch.manual_seed(r["seed"])
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    g = torch.Generator().manual_seed(r["seed"])
    losses = []
    model.train()
    for step in range(r["steps"]):
        lr = r["lr"] * min(1.0, (step + 1) / r["warmup"]) * (0.1 + 0.9 * (1 - step / r["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - r["seq"] - 1, (r["batch"],), generator=g)
        x = torch.stack([data[s:s + r["seq"]] for s in starts])
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 10 == 0 and os.environ.get("GGUFORGE_TRAIN_LOG"):
            print(f"step {step} loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    model.eval()
    return losses


def trained_model(cache: Path = CACHE) -> Path:
    """The trained checkpoint's directory (config, tokenizer, model.safetensors float32, train.txt,
    eval.txt, recipe.json with the loss curve), built once per recipe and cached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_mocks

    out = cache / "trained" / f"{RECIPE['arch']}-{recipe_key()}"
    if (out / "recipe.json").is_file():
        return out
    import fcntl

    import torch
    import transformers
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes wait for one build
        if (out / "recipe.json").is_file():
            return out
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_mocks.make_mock(RECIPE["arch"], tmp, size=RECIPE["size"], seed=RECIPE["seed"], full_precision=True)
        transformers.utils.logging.set_verbosity_error()
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp))
        text = structured_text(RECIPE["text_seed"], RECIPE["paragraphs"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        losses = _train(model, ids, RECIPE)
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "train.txt").write_text(text, encoding="utf-8")
        (tmp / "eval.txt").write_text(structured_text(EVAL_SEED), encoding="utf-8")
        (tmp / "recipe.json").write_text(json.dumps(dict(RECIPE, tokens=len(ids), loss_first=losses[0],
                                                         loss_last=sum(losses[-10:]) / 10), indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


if __name__ == "__main__":
    print(trained_model())
