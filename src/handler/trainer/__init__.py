"""Serverless data-parallel training: the Lambda trainer's domain code.

Modules, one concept each (data flows event -> validate -> plan -> train or aggregate -> persist -> signal):

- ``protocol``      event dataclasses and ``parse_event``
- ``config``        environment variable names and the training configuration
- ``errors``        the exception hierarchy
- ``logs``          one JSON object per log line, per-invocation keys
- ``efs_layout``    every path under the EFS mount, atomic file writes
- ``coordination``  DynamoDB run/round items, conditional writes
- ``models``        VGG-19 variants (Keras 3 functional API)
- ``schedule``      rounds, shards and the learning rate of a run
- ``data``          memory-mapped dataset, per-epoch shards, augmentation
- ``training``      one worker's local steps
- ``aggregation``   averaging updates and the outer (server) update
- ``invocation``    asynchronous self-invocation
- ``rounds``        the start / worker / combine / failure flows that tie the above together
"""
