"""An embedded window scheduler: Lotus's resource model, one ledger per worker, operator policy.

This package never imports `sectorfsm.sealing`.
"""
