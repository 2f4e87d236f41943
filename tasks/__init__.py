"""Stage logic as plain functions: local input paths and an output folder in, an artifact reference out.

No module here imports Prefect; where a root on object storage differs from a folder is decided in storage.py and
artifacts.py only, and every file and folder name is in layout.py. flows/ wires the stages (flows/runner.py).
"""
