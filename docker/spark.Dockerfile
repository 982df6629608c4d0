# Spark 4 (the pyspark wheel ships Spark itself) + sparkbridge: one image for the master, the
# workers and spark-submit. Build from the repository root:
#   docker build -f docker/spark.Dockerfile -t sparkbridge-spark .
FROM python:3.11-slim-bookworm

# Executors never run torch: the CPU wheel keeps the image ~2 GB smaller than the CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian's security updates replace exact package versions, so pinning them breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sparkbridge
COPY pyproject.toml constraints.txt README.md ./
COPY sparkbridge ./sparkbridge
COPY etl ./etl
COPY bridge ./bridge
COPY jobs ./jobs
# constraints.txt pins every version; the CPU index only changes which torch build is fetched.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt ".[demo]"

# Spark's launch scripts live inside the pyspark package; executors run this image's python.
ENV SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=python3 \
    PYSPARK_DRIVER_PYTHON=python3 \
    SPARK_NO_DAEMONIZE=1 \
    SPARK_WORKER_DIR=/tmp/spark-work
ENV PATH="${SPARK_HOME}/bin:${PATH}"

# /data is the volume every container shares (raw CSVs a job reads must be visible to all executors).
RUN useradd --create-home --uid 1000 spark \
    && mkdir -p /data /tmp/spark-work \
    && chown spark:spark /data /tmp/spark-work
USER 1000:1000

EXPOSE 7077 8080 8081
ENTRYPOINT ["tini", "--"]
CMD ["spark-class", "org.apache.spark.deploy.master.Master", "--host", "0.0.0.0", "--port", "7077", "--webui-port", "8080"]
