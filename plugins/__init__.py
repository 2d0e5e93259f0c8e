"""eigen_export's plugins, installed as `eigen_export_plugins` (the folder keeps TensorRT's plugin/<name>/ shape)."""
