"""The SMG gateway's worker contract (``vllm.grpc.engine.VllmEngine``) served by our engine: request
translation (``requests``), stop strings (``stops``), KV events (``kv_events``), tokenizer files
(``tokenizer_files``) and the servicer (``servicer``)."""
