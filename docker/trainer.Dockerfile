# The training side: torch + mosaicml-streaming + sparkbridge, no Java. Streams MDS shards from
# S3 (or a mounted folder) into PyTorch. Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t sparkbridge-trainer .
# For NVIDIA GPUs keep the default PyPI torch (CUDA wheels); for a CPU-only image pass
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sparkbridge
COPY pyproject.toml constraints.txt README.md ./
COPY sparkbridge ./sparkbridge
COPY etl ./etl
COPY bridge ./bridge
COPY jobs ./jobs
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt .

RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /cache /out \
    && chown trainer:trainer /cache /out
USER 1000:1000

ENTRYPOINT ["sparkbridge"]
CMD ["--help"]
