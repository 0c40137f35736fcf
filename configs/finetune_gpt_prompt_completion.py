r"""Fine-tune a t5x_lite GPT on prompt/completion pairs, with the loss on the completion only.

    ARGS=init_from=/tmp/tiny_gpt,train=/data/train.jsonl,validation=/data/dev.jsonl,steps=1000
    python -m t5x_lite.train --workdir=/tmp/ft_gpt \
        --config=configs/finetune_gpt_prompt_completion.py:$ARGS
    python -m t5x_lite.evaluate --workdir=/tmp/ft_gpt --checkpoint=all

Data: JSONL {"inputs": prompt, "targets": completion} or TSV. Each pair becomes one causal-LM row
`prompt + completion + EOS` (objective "prompt_completion": the prompt gets loss weight 0); the
decoder start id 0 comes first, as in pretraining, and evaluation prompts `[0] + prompt`.
Model / vocabulary from init_from (a t5x_lite GPT with a sentencepiece vocab.model: GPT-2's BPE
vocabulary is not supported by the data pipeline). AdamW, lr 1e-4 with warmup and cosine decay;
rows of inputs_length=512 tokens (config arg). Without init_from: a tiny GPT from scratch.
"""
from t5x_lite import finetune_config


def get_config(arg: str = ""):
    return finetune_config.build(arg, family="gpt", objective="prompt_completion",
                                 inputs_length=512, lr=1e-4, optimizer="adamw")
