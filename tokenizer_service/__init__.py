"""The tokenizer service: chat templates, tokenization, incremental detokenization, stop strings and
Qwen3 reasoning split, in front of the engine service (token ids in/out) which it calls over gRPC."""
