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
- ``services``      the adapters every flow uses, warm-container caches of the model and dataset map
- ``runs``          flow: start (direct or S3), resume, stop, and a round's fan-out
- ``worker``        flow: train a share of a round, write the update, register, claim the combine
- ``combine``       flow: average, outer update, evaluate, commit the round, fan out or finish
- ``failures``      flow: failure records re-dispatched with the next attempt, or the run FAILED
"""
