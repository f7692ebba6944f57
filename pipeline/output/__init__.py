"""What Longloom writes for users beyond its Parquet output: exports to the formats trainers read."""
