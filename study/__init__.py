"""The NTP-vs-PRIOR replication study (research tooling: never imported by the tutorial files). Run: python -m study --help"""
