"""Bridges from saved audit results to the tools teams already run (experiment trackers).

Each integration reads results (an AuditResult or a results directory) and needs no torch; the
third-party package it talks to is an optional extra, imported only when it is used.
"""
