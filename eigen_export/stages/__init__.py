"""One module per stage (DESIGN 1): the glue between settings, artifacts, method and backends. Each has a
run_* function and the stage's `is_current` test, which common.must_make turns into the one skip rule."""
