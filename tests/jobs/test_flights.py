"""The flights feature pipeline on a real slice, every figure recomputed independently with pandas.

Checks go through Spark aggregates (one metadata row each), never by collecting the features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparkbridge.jobs import flights

ROWS = 3_000


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return flights.extract_raw(tmp_path_factory.mktemp("raw"), rows=ROWS)


@pytest.fixture(scope="module")
def features(spark, raw):
    feats = flights.build_features(spark, raw, partitions=2)
    yield feats
    feats.unpersist()


def _pandas(raw) -> tuple[pd.DataFrame, pd.Series]:
    """Labelled flights joined with the hourly weather, and the test mask, from pandas alone."""
    df = pd.read_csv(raw.flights)
    weather = pd.read_csv(raw.weather)
    keys = ["origin", "year", "month", "day", "hour"]
    hourly = weather.groupby(keys, as_index=False)[flights.WEATHER].mean()
    labelled = df[df["arr_delay"].notna()].merge(hourly, on=keys, how="left", validate="many_to_one")
    test = ((labelled["flight"] + labelled["day"]) % 5) == 0
    return labelled, test, weather


@pytest.mark.slow
def test_counts_vocab_and_values_match_pandas(features, raw):
    from pyspark.sql import functions as F

    df = pd.read_csv(raw.flights)
    labelled, test, weather = _pandas(raw)
    delayed = (labelled["arr_delay"] > 15).astype(int)
    assert features.counts == {
        "rows_source": ROWS,
        "rows_dropped_cancelled": int(df["dep_time"].isna().sum()),
        "rows_dropped_diverted": int((df["dep_time"].notna() & df["arr_delay"].isna()).sum()),
        "rows_train": int((~test).sum()),
        "rows_test": int(test.sum()),
        "positives_train": int(delayed[~test].sum()),
        "positives_test": int(delayed[test].sum()),
    }
    train = labelled[~test]
    for name in ("carrier", "origin", "dest"):
        assert features.vocab[name] == sorted(train[name].unique())
        assert features.cardinality[f"{name}_idx"] == len(features.vocab[name]) + 1
    assert features.train.columns == flights.CATEGORICAL + flights.NUMERIC + [flights.LABEL]

    # Weather: gaps filled with the weather table's mean, standardized with its sample std, flagged.
    for c in flights.WEATHER:
        assert features.weather_fill[c] == pytest.approx(weather[c].mean(), rel=1e-9)
    aggs = features.train.agg(
        *[F.sum(f"wx_{c}").alias(c) for c in flights.WEATHER],
        *[F.sum(f"wx_{c}_missing").alias(f"{c}_missing") for c in flights.WEATHER],
        F.sum("hour_idx").alias("hours"),
        F.sum("dow_idx").alias("dows"),
        F.sum("month_idx").alias("months"),
        F.sum("delayed").alias("delayed"),
        F.sum(F.when(F.col("dest_idx") >= len(features.vocab["dest"]), 1).otherwise(0)).alias("unseen_dest"),
    ).first()
    for c in flights.WEATHER:
        mean, std = weather[c].mean(), weather[c].std()
        expected = ((train[c].fillna(mean) - mean) / std).astype(np.float32).astype(np.float64).sum()
        assert aggs[c] == pytest.approx(expected, rel=1e-4, abs=1e-3), c
        assert aggs[f"{c}_missing"] == float(train[c].isna().sum()), c
    assert aggs["hours"] == int(train["hour"].sum())
    assert aggs["months"] == int((train["month"] - 1).sum())
    dates = pd.to_datetime(dict(year=train["year"], month=train["month"], day=train["day"]))
    assert aggs["dows"] == int(((dates.dt.dayofweek + 1) % 7).sum())  # 0 = Sunday
    assert aggs["delayed"] == features.counts["positives_train"]
    assert aggs["unseen_dest"] == 0

    # Test rows with a destination never seen in training get the extra "unseen" index.
    unseen = int((~labelled.loc[test, "dest"].isin(train["dest"].unique())).sum())
    got = features.test.where(F.col("dest_idx") == len(features.vocab["dest"])).count()
    assert got == unseen


@pytest.mark.slow
def test_unparseable_value_names_file_column_and_value(spark, tmp_path, raw):
    lines = raw.flights.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("arr_delay")] = "late"
    bad = tmp_path / "flights.csv"
    bad.write_text("\n".join([lines[0], ",".join(row)] + lines[2:50]) + "\n")
    with pytest.raises(ValueError) as err:
        flights.build_features(spark, flights.RawFiles(flights=bad, weather=raw.weather, rows=49))
    msg = str(err.value)
    assert str(bad) in msg and "'arr_delay'" in msg and "1 value(s)" in msg and "late" in msg


@pytest.mark.slow
def test_a_slice_without_test_rows_is_refused(spark, tmp_path):
    one = flights.extract_raw(tmp_path, rows=1)  # flight 1545 on day 1 → training split only
    with pytest.raises(ValueError, match="left 1 training and 0 test rows"):
        flights.build_features(spark, one)
