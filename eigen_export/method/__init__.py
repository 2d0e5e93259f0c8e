"""The method, on tensors only (no disk): eigenbases and rank rules, the layer-by-layer calibration pass,
the fold, KV-head merging, the metrics the report computes."""
