"""The engine's leaf utilities: errors, fingerprints, atomic writes, locks, distributed ranks.

They import nothing above them (no other pipeline module, no stage, no ML library, no data module).
"""
