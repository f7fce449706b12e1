"""The Ray glue: one file per stage (pretrain, baselines, extract, probe, report)."""
