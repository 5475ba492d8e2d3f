"""Benchmark: dynamic-skip on an MoE whose router was trained, here, from scratch.

No pretrained MoE can be downloaded on this machine, and the real-weights MoE at hand (MiniLM converted by
dense-to-moe) gives a token's chosen experts equal routing weights, so the skip rule has nothing to drop
there (docs/BENCHMARKS.md). This bench trains a small Mixtral-style causal LM (4 layers, hidden 128, 8
experts of 256, top-2) on standard-library docstrings for a fixed number of steps (seeded), then measures in
one run, on held-out sentences, for each skip threshold:

* the share of (real token, routed expert) evaluations skipped and the share of routing weight they carried
  (``moec.passes.dynamic_skip.skip_statistics``, padding left out);
* the cost against the same compiled model without skipping: 1 - mean cosine of mean-pooled sentence
  embeddings (last hidden state), nearest-neighbour agreement, and 1 - mean cosine of the token rows;
* how close together this model's sentence embeddings lie (mean pairwise cosine): the closer, the less
  a small embedding-cosine cost says.

It is a trained router on a small model trained for minutes, not a real-weights model; read it as how the
rule behaves when routing weights differ, not as the real-weights target.

Run:  python tools/bench/dynamic_skip_trained.py [--steps 400] [--out bench-results/dynamic_skip_trained.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int  # noqa: E402

import moec  # noqa: E402
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches  # noqa: E402
from moec.analysis.quality import embedding_quality, mean_pooled  # noqa: E402
from moec.frontend.zoo import minilm_path  # noqa: E402
from moec.passes.dynamic_skip import skip_statistics  # noqa: E402

SEED = 0
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
PARITY_TOLERANCE = 1e-4  # float32, compiled without skipping vs the trained Hugging Face model
TRAIN_SENTENCES, HELD_OUT_SENTENCES, BATCH, MAX_TOKENS = 2400, 256, 32, 64


def config(vocab_size: int) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
        router_aux_loss_coef=0.01, tie_word_embeddings=True)


def train(tokenizer, sentences: list[str], steps: int) -> transformers.MixtralModel:
    """A Mixtral-style LM trained for ``steps`` AdamW steps of next-token loss (plus the router's load-balancing
    loss) on ``sentences``; returns its base model (the last hidden state is what the embeddings pool)."""
    torch.manual_seed(SEED)
    model = transformers.MixtralForCausalLM(config(tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    batches = tokenized_batches(tokenizer, sentences, BATCH, MAX_TOKENS)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}: loss {out.loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return model.model.eval()


def embeddings(states: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """[N, H] unit sentence embeddings (mean-pooled real tokens) of a list of [B, S, H] last hidden states."""
    return torch.cat([mean_pooled(state, mask) for state, mask in zip(states, masks, strict=True)])


def token_row_cosine(reference: list[torch.Tensor], candidate: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Mean cosine between the real tokens' rows of two lists of [B, S, H] last hidden states."""
    rows = [torch.nn.functional.cosine_similarity(a[m.bool()], b[m.bool()], dim=-1)
            for a, b, m in zip(reference, candidate, masks, strict=True)]
    return torch.cat(rows).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (about 0.5 s each on 2 CPUs)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="bench-results/dynamic_skip_trained.json")
    args = parser.parse_args()
    args.out = output_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    train_text, held_out_text = calibration_and_held_out(TRAIN_SENTENCES, HELD_OUT_SENTENCES)
    print(f"training {args.steps} steps on {len(train_text)} sentences ...", flush=True)
    start = time.perf_counter()
    model = train(tokenizer, train_text, args.steps)
    train_seconds = time.perf_counter() - start
    held_out = [{key: batch[key] for key in ("input_ids", "attention_mask")}
                for batch in tokenized_batches(tokenizer, held_out_text, BATCH, MAX_TOKENS)]
    masks = [batch["attention_mask"] for batch in held_out]
    example = {key: value[:2] for key, value in held_out[0].items()}
    plain = moec.compile(model, example)
    with torch.inference_mode():
        plain_states = [plain(**batch).last_hidden_state for batch in held_out]
        parity = max((plain_states[i] - model(**batch).last_hidden_state).abs().max().item()
                     for i, batch in enumerate(held_out))
    reference = embeddings(plain_states, masks)
    pairwise = reference @ reference.T
    spread = ((pairwise.sum() - pairwise.diagonal().sum()) / (len(reference) * (len(reference) - 1))).item()
    print(f"compiled vs Hugging Face: max abs diff {parity:.2e}; mean pairwise cosine of the held-out "
          f"embeddings {spread:.3f}")
    if not parity <= PARITY_TOLERANCE:
        raise SystemExit(f"the model compiled without skipping differs from Hugging Face by {parity:.3g} "
                         f"(> {PARITY_TOLERANCE:g}); the skip costs below would be measured against a wrong baseline")
    rows = []
    for threshold in THRESHOLDS:
        skipping = moec.compile(model, example, recipe={"passes": [{"dynamic-skip": {"threshold": threshold}}]})
        stats = skip_statistics(skipping.program, [skipping.program.flatten_inputs((), b) for b in held_out])
        with torch.inference_mode():
            states = [skipping(**batch).last_hidden_state for batch in held_out]
        quality = embedding_quality(reference, embeddings(states, masks))
        row = {"threshold": threshold, "evaluations": stats["evaluations"], "skipped": stats["skipped"],
               "skipped_fraction": stats["skipped_fraction"], "dropped_weight": stats["dropped_weight"],
               "embedding_cosine_cost": 1 - quality["cosine"], "nn_agreement": quality["nn_agreement"],
               "token_cosine_cost": 1 - token_row_cosine(plain_states, states, masks)}
        rows.append(row)
    print(f"\n{'threshold':>9} | {'skipped':>16} | {'weight dropped':>14} | {'1 - emb. cosine':>15} | "
          f"{'NN agreement':>12} | {'1 - token cosine':>16}")
    for row in rows:
        print(f"{row['threshold']:>9} | {row['skipped']:>6,} ({row['skipped_fraction']:6.1%}) | "
              f"{row['dropped_weight']:>14.1%} | {row['embedding_cosine_cost']:>15.4f} | {row['nn_agreement']:>12.1%} | "
              f"{row['token_cosine_cost']:>16.4f}")
    result = {"benchmark": "dynamic_skip_trained", "steps": args.steps, "train_seconds": train_seconds,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "loadavg": os.getloadavg(), "parity_max_abs_diff": parity, "mean_pairwise_cosine": spread,
              "held_out_sentences": len(held_out_text), "rows": rows}
    out = args.out
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
