"""The ML library the stages share: models, checkpoints, attacks, losses, the training loop and its
resume state, evaluation. Plain functions on tensors and modules; no config objects, no engine.
"""
