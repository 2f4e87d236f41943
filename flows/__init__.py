"""Orchestration: the config, the stage table and its runner (each stage a cached Prefect task), the flows, the
command line and the commands that read the store. No stage's code version covers anything here.
"""
