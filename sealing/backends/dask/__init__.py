"""The `dask` sealer backend: remote `sectors worker`s on Dask distributed (`sealer.py` is the
backend the registry holds; the modules beside it are its pieces)."""
