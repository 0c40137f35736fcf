r"""Supervised instruction fine-tuning of a t5x_lite GPT (instruction / input / response).

    # 1. instruction records {"instruction", "input" (optional), "output"} -> prompt/completion
    python -m t5x_lite.finetune_templates --input=alpaca.jsonl --output=/data/sft/train.jsonl
    python -m t5x_lite.finetune_templates --input=alpaca_dev.jsonl --output=/data/sft/dev.jsonl
    # 2. train: loss on the response only
    ARGS=init_from=/tmp/gpt,train=/data/sft/train.jsonl,validation=/data/sft/dev.jsonl
    python -m t5x_lite.train --workdir=/tmp/sft --config=configs/finetune_gpt_instruction.py:$ARGS
    # 3. evaluate: loss / perplexity of the responses, greedy responses vs references
    python -m t5x_lite.evaluate --workdir=/tmp/sft --checkpoint=all

The prompt is `t5x_lite.finetune_templates.InstructionTemplate().prompt(instruction, input)`
(Alpaca layout: header, "### Instruction:", "### Input:" when there is one, "### Response:");
query a tuned model with the same function. Same optimizer and objective as
finetune_gpt_prompt_completion.py, with 3 epochs' worth of steps being typical (steps=).
"""
from t5x_lite import finetune_config


def get_config(arg: str = ""):
    c = finetune_config.build(arg, family="gpt", objective="prompt_completion",
                              inputs_length=512, lr=1e-4, optimizer="adamw")
    c.decode.max_new_tokens = min(128, max(c.data.seq_len // 2, 1))  # at most half a row
    return c
