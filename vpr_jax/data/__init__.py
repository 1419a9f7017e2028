"""Data: the training set, benchmark sets, images, augmentation, worker processes, TFDS, synthetic data.

Subpackages by concern: `training/` (GSV-Cities places, the train pipeline), `evaluation/`
(benchmark sets, their registry, evaluation batches), `imaging/` (decoding, resizing),
`augmentation/` (RandAugment on the host and on the device), `multiprocess/` (grain worker
processes and their shared memory), `tfds/` (prepared datasets); `roots.py` (the data root) and
`synthetic.py` (synthetic cities) beside them.
"""
