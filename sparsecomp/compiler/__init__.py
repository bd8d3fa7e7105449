"""Compiling: site preparation (one path for compile, calibrate and autotune), the Dynamo backend
and the per-site decision."""
