"""One typed reader and writer per on-disk record (DESIGN 1): calib/, folded/ (eigen.json), merge.json,
onnx/io.json, engine/build.json, report/. layout.py is the only place that knows folder and file names."""
