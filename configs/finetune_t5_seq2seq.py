r"""Fine-tune a T5 checkpoint (ours, or converted from HF) on inputs/targets pairs (seq2seq).

    python -m t5x_lite.convert --from_hf=/models/t5-v1_1-base --workdir=/tmp/t5_base   # once
    ARGS=init_from=/tmp/t5_base,train=/data/train.tsv,validation=/data/dev.tsv,steps=2000
    python -m t5x_lite.train --workdir=/tmp/ft_t5 --config=configs/finetune_t5_seq2seq.py:$ARGS
    python -m t5x_lite.evaluate --workdir=/tmp/ft_t5 --checkpoint=all   # or --follow beside it

Data: TSV `inputs<TAB>targets` or JSONL {"inputs", "targets"} (format= from the extension).
Model, vocabulary and extra_ids come from init_from's config.json / vocab.model; params only
(fresh Adafactor, constant lr 1e-3 as in the T5 paper's fine-tuning, step 0). Lengths:
inputs_length=512, targets_length=128 (config args). Without init_from: a tiny T5 from scratch.
Measured (tests/evaluate_finetune_test.py): a 0.25M-param T5 learns a synthetic "sort the
letters" task to 100% exact match and BLEU on held-out pairs in 200 steps; see
README.md.
"""
from t5x_lite import finetune_config


def get_config(arg: str = ""):
    return finetune_config.build(arg, family="t5", objective="seq2seq", inputs_length=512,
                                 targets_length=128, lr=1e-3, optimizer="adafactor")
