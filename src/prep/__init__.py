"""CIFAR-10 data preparation: the python pickles become NumPy arrays on EFS.

- :mod:`prep.cifar` decodes a local archive or folder into ``train_x.npy`` … ``manifest.json``, atomically.
- :mod:`prep.download` fetches the official archive (resumable, md5-checked) when no source is given.
- :mod:`prep.upload` sends a prepared dataset to S3 and invokes the staging function.
- :mod:`prep.stage` is that staging function (a Lambda handler; standard library and boto3 only).
- :mod:`prep.cli` is the ``cifar10-prep`` console script behind ``make preprocess``.
- :mod:`prep.synthetic` writes a small learnable stand-in through the same writer, for tests and benchmarks.
"""
