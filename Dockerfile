# The engine service on a CUDA machine: `docker build -t qwen3-serve-engine .`, then
#   docker run --gpus all -v /models/Qwen3-8B:/model -p 50051:50051 -p 9400:9400 qwen3-serve-engine --model /model
# Serves qwen3serve.engine.v1.EngineService and vllm.grpc.engine.VllmEngine (SMG's worker contract) on 50051,
# grpc.health.v1 for probes, Prometheus metrics on 9400. docs/DEPLOY.md has the cluster set-up.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY qwen3 qwen3
COPY engine_service engine_service
COPY tokenizer_service tokenizer_service
COPY service_common service_common
COPY clients clients
# torch from PyPI is the CUDA build; the install generates the gRPC code (setup.py) and `.[gpu]` adds FA4.
RUN pip install "torch==2.13.0" && pip install ".[gpu]"

RUN useradd --create-home --uid 10001 engine
USER engine
EXPOSE 50051 9400
ENTRYPOINT ["python", "-m", "engine_service", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
