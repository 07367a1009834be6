"""The local runtime: AWS Lambda, DynamoDB and EFS replaced by local stand-ins, so the unchanged handler runs here.

Modules, one concept each:

- ``bootstrap``       runs inside each worker process: imports the handler once, serves invocations
- ``pool``            long-lived worker processes with deadlines (warm reuse, SIGKILL at the timeout)
- ``function``        a function's invoke semantics: async queue, retries, ``OnFailure`` records, faults
- ``faults``          fault injection for tests: deliver an event twice, delay it, kill its invocation
- ``lambda_api``      the Lambda Invoke API on 127.0.0.1, reached through ``AWS_ENDPOINT_URL_LAMBDA``
- ``dynamodb_local``  DynamoDB Local's lifecycle and the status table built from ``template.yaml``
- ``environment``     the handler processes' environment and local boto3 client settings
- ``progress``        a run's progress read from DynamoDB, as an operator would see it
- ``cli``             ``lambdatrain local``

Nothing here is deployed, and nothing here knows how training works.
"""
