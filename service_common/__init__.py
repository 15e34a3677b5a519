"""What both gRPC servers share: the domain errors and their one mapping to status codes, the server
builder (limits, keepalive, health, reflection, graceful shutdown), structured logging and the metrics
exporter. Nothing here imports torch: the tokenizer service runs without it.
"""
