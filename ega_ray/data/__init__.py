"""Data: the Parquet format, preparation of bundled data, and on-device augmentation."""
