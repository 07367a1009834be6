"""The local runtime: AWS Lambda, DynamoDB and EFS replaced by local stand-ins, so the unchanged handler runs here.

Modules, one concept each:

- ``bootstrap``       runs inside each worker process: imports the handler once, serves invocations
- ``pool``            long-lived worker processes with deadlines (warm reuse, SIGKILL at the timeout)
- ``function``        a function's invoke semantics: async queue, retries, ``OnFailure`` records, faults
- ``faults``          fault injection for tests: deliver an event twice, delay it, kill its invocation
- ``lambda_api``      the Lambda Invoke API on 127.0.0.1, reached through ``AWS_ENDPOINT_URL_LAMBDA``
- ``dynamodb_local``  DynamoDB Local's lifecycle and the status table built from ``template.yaml``
- ``environment``     the handler processes' environment and local boto3 client settings
- ``settings``        one function's settings (SAM's view plus concurrency) and their defaults
- ``runtime``         DynamoDB Local, the Invoke API and one function as one context manager
- ``progress``        a run's progress read from DynamoDB, as an operator would see it
- ``monitor``         following a run: refusing or resuming it, progress, failures, Ctrl-C as a stop request
- ``start_event``     the start event from options derived from ``TrainConfig``'s fields
- ``cli``             ``lambdatrain local``: the parser, data preparation, and the command in order

Nothing here is deployed, and nothing here knows how training works.
"""
