"""Capacity planning for a prefill/decode fleet (``pdlb plan``, docs/planner.md).

How many prefill and how many decode servers a workload needs under a TTFT/TPOT SLO, and
whether a colocated fleet would need fewer: :mod:`lb.planner.profile` (per-server capacity,
measured or from the emulator's model), :mod:`lb.planner.workload` (what the requests ask
for), :mod:`lb.planner.model` (the queueing model), :mod:`lb.planner.search` (the smallest
fleets, headroom, the binding constraint), :mod:`lb.planner.simulate` (the check on an
emulator fleet), :mod:`lb.planner.online` (the live recommendation pdlb exports).
"""
