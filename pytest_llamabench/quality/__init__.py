"""Quant quality: perplexity and KL divergence with the pinned llama-perplexity, quant ladders
with the pinned llama-quantize, and the quality table's verdicts. Runs no llama-server.

corpus.py     the text scored: the embedded public-domain corpus or the user's file
tools.py      llama-perplexity / llama-quantize beside the llama-server in use
vocab.py      a GGUF's vocabulary size (a reference must share it)
output.py     llama-perplexity's printed results -> numbers
perplexity.py one run of llama-perplexity, its argv from a config's flags
reference.py  the reference model's logits, cached by model, corpus, ctx, chunks and build
quantize.py   models made with llama-quantize, cached by source, type and build
run.py        a quality workload on a config -> ResultEntry
(the quality table and its verdicts: outputs/quality_table.py; exact gate verdicts: gate/exact.py)
"""
