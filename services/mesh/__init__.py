"""The substrate every infermesh service shares.

Wire frames and the tensor codec, multiplexed links, the etcd config cache and endpoint
registration, settings, the error tree, the Postgres pool and migrations, telemetry hooks.
"""
