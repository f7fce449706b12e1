"""The Parquet feature store: schema, manifest, atomic shards, column reads."""

from sweep.features.store import FeatureStore, FeatureStoreError, feature_schema, to_table

__all__ = ["FeatureStore", "FeatureStoreError", "feature_schema", "to_table"]
