"""Custom ops the exported graphs map to (DESIGN 6); one sub-package per op."""
