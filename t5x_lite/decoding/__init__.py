"""Decoding: greedy / sampling / beam search / speculative decoding over a KV-cached step.

Pure algorithms (`sampling`, `beam_search`, `speculative`) take a
`tokens_to_logits(ids, cache) -> (logits, cache)` step; `steps` builds that step (and the
prefill) for T5 and GPT; `generate` is the user-facing API (`generate(loaded, ...)`).
"""
