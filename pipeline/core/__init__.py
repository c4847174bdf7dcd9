"""The engine's leaf utilities: errors, fingerprints, atomic writes, locks, distributed ranks.

They import nothing above them (no other pipeline module, no stage, no ML library, no data module).
With pipeline/stage.py (the Stage / Source / StageContext contract) they are the ground floor that
data, ml, stages and the engine all stand on (tests/test_architecture.py checks the direction).

Why they live under `pipeline/` and not in a package of their own: every top-level package is
installed into users' site-packages, where a generic name such as `core` would collide with other
projects' (and `from core import ...` would read as anyone's); a distinctive one (`rst_mart_core`)
would rename every import of the contract in users' plug-in stages for no change in behaviour. The
floors are spelled out in tests/test_architecture.py and docs/dev/layout.md instead.
"""
