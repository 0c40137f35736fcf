"""Input-pipeline throughput: span corruption + packing, tiny_t5-like (inputs 512, targets 114).

    python benchmarks/input_pipeline.py                       # default corpus, batch 32
    python benchmarks/input_pipeline.py --num_workers=2 --objective=causal_lm --seq_len=1024

Reports examples/s and tokens/s, where tokens are the non-padding encoder input + decoder
target tokens of the produced batches (what the model consumes), after a warm-up. The corpus
is prepared and the vocabulary trained first (cached in --data_dir), outside the timing.
"""
import json
import time

import numpy as np
from absl import app, flags

from t5x_lite import data as data_lib

_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the default corpus / vocab are cached.")
_OBJECTIVE = flags.DEFINE_string("objective", "span_corruption", "data.objective")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Per-process batch size.")
_INPUTS = flags.DEFINE_integer("inputs_length", 512, "data.inputs_length")
_TARGETS = flags.DEFINE_integer("targets_length", 114, "data.targets_length")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "data.seq_len (decoder-only)")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes")
_THREADS = flags.DEFINE_integer("read_threads", 2, "grain read/tokenize threads")
_BATCHES = flags.DEFINE_integer("batches", 100, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")


def main(argv):
    del argv
    cfg = data_lib.DataConfig(
        source="default", data_dir=_DATA_DIR.value, objective=_OBJECTIVE.value,
        inputs_length=_INPUTS.value, targets_length=_TARGETS.value, seq_len=_SEQ_LEN.value,
        num_workers=_WORKERS.value, read_threads=_THREADS.value)
    vocab = data_lib.load_vocab(cfg)
    it = data_lib.make_dataset(cfg, vocab, split="train", batch_size=_BATCH.value, seed=0)
    for _ in range(_WARMUP.value):
        next(it)
    tokens = examples = 0
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        batch = next(it)
        for side in ("encoder", "decoder"):
            seg = batch.get(f"{side}_segment_ids")
            key = "encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"
            if key in batch:
                tokens += int(np.count_nonzero(seg if seg is not None else batch[key]))
        seg = batch.get("encoder_segment_ids", batch.get("decoder_segment_ids"))
        examples += int(sum(len(np.unique(r[r > 0])) for r in seg)) if seg is not None else len(
            batch[next(iter(batch))])
    elapsed = time.perf_counter() - start
    result = {"objective": cfg.objective, "batch_size": _BATCH.value,
              "inputs_length": cfg.inputs_length, "targets_length": cfg.targets_length,
              "num_workers": cfg.num_workers, "read_threads": cfg.read_threads,
              "batches_per_s": round(_BATCHES.value / elapsed, 2),
              "examples_per_s": round(examples / elapsed, 1),
              "tokens_per_s": round(tokens / elapsed)}
    print(json.dumps(result))
    if hasattr(it, "close"):
        it.close()


if __name__ == "__main__":
    app.run(main)
