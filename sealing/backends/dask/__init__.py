"""The `dask` sealer backend: remote workers on Dask distributed (work in progress: the pieces below
are built and tested; the backend is not registered yet)."""
